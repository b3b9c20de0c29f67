//! The CLI's connection to the services: NATS plus the bearer token from
//! `TANJIREN_TOKEN` or the token file, and request/reply with typed errors
//! turned into messages.

use anyhow::Context;
use std::time::Duration;
use tanjiren_bus::call;
use tanjiren_bus::connect_nats;
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::protocol::{GetTaskRequest, TaskView};
use tanjiren_shared::subjects::Subjects;

pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Client {
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    pub token: String,
}

impl Client {
    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        let token = tanjiren_bus::config::resolve_token(config).with_context(|| {
            format!(
                "no API token: run `tanjiren up` once (it saves one at {}), or set TANJIREN_TOKEN",
                tanjiren_bus::config::token_path(config).display()
            )
        })?;
        let nats = connect_nats(config, "tanjiren-cli").await?;
        Ok(Self {
            nats,
            subjects: config.subjects(),
            token,
        })
    }

    /// One request; a wire error becomes `code: message`.
    pub async fn call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        req: &Req,
    ) -> anyhow::Result<Resp> {
        call(&self.nats, &subject, &self.token, req, REQUEST_TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))
    }

    pub async fn get(&self, id: TaskId) -> anyhow::Result<TaskView> {
        self.call(self.subjects.tasks_get(), &GetTaskRequest::new(id)).await
    }
}
