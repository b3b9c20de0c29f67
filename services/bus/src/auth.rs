//! Who is calling: the seam between serving (here) and the token store (in
//! `tanjiren-store`, which looks tokens up in Postgres). Serving only needs
//! "Authorization header → principal or a typed error".

use futures::future::BoxFuture;
use tanjiren_shared::WireError;
use tanjiren_shared::protocol::Principal;

/// Resolves a request's `Authorization` header value to its principal.
///
/// # Errors
/// `unauthorized` for a missing, unknown or revoked token; `unavailable` when the
/// token store cannot be reached.
pub trait Authenticate: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, authorization: Option<&'a str>) -> BoxFuture<'a, Result<Principal, WireError>>;
}
