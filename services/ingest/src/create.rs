//! `tasks.create`: the request/reply way to create tasks, a batch per handler
//! call, through the one creation path in `tanjiren_store::tasks`.

use tanjiren_shared::WireError;
use tanjiren_shared::model::TaskSpec;
use tanjiren_shared::protocol::CreateTaskReply;
use tanjiren_store::tasks::create_tasks;
use tanjiren_store::{Connections, Incoming};

pub(crate) async fn handle(
    conns: Connections,
    batch: Vec<Incoming<TaskSpec>>,
) -> Vec<Result<CreateTaskReply, WireError>> {
    create_tasks(&conns, batch.into_iter().map(|i| (i.principal, i.body)).collect()).await
}
