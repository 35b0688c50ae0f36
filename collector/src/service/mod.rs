//! The gRPC services, one module each: parse and validate the request,
//! apply it (blocking work in `Ctx::blocking`), answer.

pub mod admin;
pub mod agent;
pub mod enroll;

use tonic::{Request, Status};

use crate::auth::Caller;

/// The caller the interceptor put into the request.
pub(crate) fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified caller"))
}
