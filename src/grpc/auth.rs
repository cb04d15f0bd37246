//! Callers and keys on the gRPC port, as a tower layer in front of every kabar service: a new
//! RPC cannot forget it. Health and reflection stay open. The caller's key arrives as
//! `authorization: Bearer <key>`; without a valid key the call is UNAUTHENTICATED, without the
//! RPC's scope PERMISSION_DENIED (`MISSING_SCOPE`). The caller goes into the request (for the
//! handlers: idempotency keys are scoped by caller) and into the answer (for the call's log line).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use tonic::Status;

use super::calls::method_of;
use crate::{
    domain::{
        auth::{Caller, KeyRing, Scope},
        error::Error,
    },
    metrics::Method,
};

/// The scope each RPC needs.
pub fn scope_of(method: Method) -> Scope {
    match method {
        Method::SendOtp | Method::VerifyOtp => Scope::Otp,
        Method::SendTemplate | Method::SubmitBatch | Method::CancelBatch | Method::ResumeBatch => {
            Scope::Notify
        }
        Method::GetMessageStatus
        | Method::WatchMessageStatus
        | Method::GetBatch
        | Method::WatchBatch
        | Method::ListBatchItems => Scope::Status,
    }
}

/// The keys in force; replaced whole when the key file is read again.
pub type Keys = Arc<RwLock<KeyRing>>;

/// Checks every call to a kabar service; `None` lets every call in (no key file).
#[derive(Clone)]
pub struct AuthLayer(pub Option<Keys>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = WithAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithAuth {
            inner,
            keys: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct WithAuth<S> {
    inner: S,
    keys: Option<Keys>,
}

/// The key of a call: `authorization: Bearer <key>`.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// Who may make this call: the caller, or the error to answer.
fn admit(keys: &KeyRing, path: &str, headers: &http::HeaderMap) -> Result<Caller, Error> {
    let key = bearer(headers).ok_or(Error::Unauthenticated { missing: true })?;
    let caller = keys
        .caller(key)
        .ok_or(Error::Unauthenticated { missing: false })?;
    // A path that is no kabar RPC needs a known key, and tonic then answers UNIMPLEMENTED.
    if let Some(method) = method_of(path) {
        let scope = scope_of(method);
        if !caller.may(scope) {
            return Err(Error::MissingScope {
                caller: caller.name.clone(),
                scope: scope.as_str(),
                method: method.name(),
            });
        }
    }
    Ok(caller.clone())
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for WithAuth<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(keys) = &self.keys else {
            return Box::pin(inner.call(request));
        };
        if !request.uri().path().starts_with("/kabar.") {
            // Health and reflection.
            return Box::pin(inner.call(request));
        }
        let admitted = {
            let ring = keys.read().unwrap_or_else(|e| e.into_inner());
            admit(&ring, request.uri().path(), request.headers())
        };
        match admitted {
            Err(e) => {
                let response = Status::from(e).into_http();
                Box::pin(async move { Ok(response) })
            }
            Ok(caller) => {
                request.extensions_mut().insert(caller.clone());
                Box::pin(async move {
                    let mut response = inner.call(request).await?;
                    response.extensions_mut().insert(caller);
                    Ok(response)
                })
            }
        }
    }
}

/// The caller of a call, when kabar checks keys.
pub fn caller_of<T>(request: &tonic::Request<T>) -> Option<&Caller> {
    request.extensions().get::<Caller>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::auth::{key_hash, new_key};

    #[test]
    fn keys_and_scopes_decide() {
        let key = new_key();
        let ring = KeyRing::parse(&format!(
            "[[key]]\nname = \"portal\"\nhash = \"{}\"\nscopes = [\"otp\"]\n",
            key_hash(&key)
        ))
        .unwrap();
        let with = |value: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        let otp = "/kabar.v1.OtpService/SendOtp";
        let notify = "/kabar.v1.NotificationService/SendTemplate";
        assert!(matches!(
            admit(&ring, otp, &http::HeaderMap::new()),
            Err(Error::Unauthenticated { missing: true })
        ));
        assert!(matches!(
            admit(&ring, otp, &with("Bearer kabar_nope")),
            Err(Error::Unauthenticated { missing: false })
        ));
        assert!(matches!(
            admit(&ring, otp, &with(&key)),
            Err(Error::Unauthenticated { missing: true })
        ));
        assert_eq!(
            admit(&ring, otp, &with(&format!("bearer {key}")))
                .unwrap()
                .name,
            "portal"
        );
        assert!(matches!(
            admit(&ring, notify, &with(&format!("Bearer {key}"))),
            Err(Error::MissingScope {
                scope: "notify",
                ..
            })
        ));
    }
}
