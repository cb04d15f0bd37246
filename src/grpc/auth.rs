//! Callers and keys on the gRPC port, as a tower layer in front of every kabar service: a new
//! RPC cannot forget it. Health and reflection stay open. The caller's key arrives as
//! `authorization: Bearer <key>`; without a valid key the call is UNAUTHENTICATED, without the
//! RPC's scope PERMISSION_DENIED (`MISSING_SCOPE`). The caller goes into the request (for the
//! handlers: idempotency keys are scoped by caller) and into the answer (for the call's log line).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

use super::calls::method_of;
use crate::{
    domain::{
        auth::{Caller, KeyRing, Scope, hash_of, quota_take},
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
        Method::GetSettings | Method::UpdateSettings => Scope::Admin,
    }
}

/// The keys in force, replaced whole when the key file is read again; each replacement counts
/// one generation, so that open streams notice it.
pub struct KeysInForce {
    ring: RwLock<KeyRing>,
    generation: AtomicU64,
}

impl KeysInForce {
    pub fn new(ring: KeyRing) -> Self {
        KeysInForce {
            ring: RwLock::new(ring),
            generation: AtomicU64::new(0),
        }
    }

    pub fn replace(&self, ring: KeyRing) {
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = ring;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }
}

pub type Keys = Arc<KeysInForce>;

/// Checks every call to a kabar service; without keys (no key file) every call is let in.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Option<Keys>,
    quotas: Arc<Quotas>,
}

impl AuthLayer {
    pub fn new(keys: Option<Keys>) -> Self {
        AuthLayer {
            keys,
            quotas: Arc::new(Quotas::default()),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = WithAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithAuth {
            inner,
            keys: self.keys.clone(),
            quotas: self.quotas.clone(),
        }
    }
}

#[derive(Clone)]
pub struct WithAuth<S> {
    inner: S,
    keys: Option<Keys>,
    quotas: Arc<Quotas>,
}

/// The callers' quotas on this replica: when each caller's next call is due (see
/// [`quota_take`]), by name (one entry per caller of the key file).
struct Quotas {
    start: std::time::Instant,
    next: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            start: std::time::Instant::now(),
            next: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl Quotas {
    /// Counts one call of `caller` against its quota, or says how long to wait.
    fn take(&self, caller: &Caller) -> Result<(), Error> {
        let Some(rate) = caller.calls_per_second else {
            return Ok(());
        };
        let now = self.start.elapsed().as_micros() as u64;
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let due = next.entry(caller.name.clone()).or_insert(0);
        match quota_take(*due, now, rate) {
            Ok(after) => {
                *due = after;
                Ok(())
            }
            Err(wait) => Err(Error::Limited {
                reason: crate::domain::reason::Reason::CallerQuota,
                message: format!(
                    "{} is over its quota of {rate} calls per second (calls_per_second in \
                     KABAR_API_KEYS_FILE)",
                    caller.name
                ),
                retry_after: std::time::Duration::from_micros(wait),
            }),
        }
    }
}

/// The key of a call: `authorization: Bearer <key>`, sent once.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let value = value.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// A caller let in: who, by the hash of which key, for which scope (None: a path that is no
/// kabar RPC; tonic answers UNIMPLEMENTED).
struct Admitted {
    caller: Caller,
    key_hash: [u8; 32],
    scope: Option<Scope>,
}

/// Who may make this call, or the error to answer (with the caller, when known).
fn admit(
    keys: &KeyRing,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<Admitted, Box<(Error, Option<Caller>)>> {
    let Some(key) = bearer(headers) else {
        let missing = headers.get(http::header::AUTHORIZATION).is_none();
        return Err(Box::new((Error::Unauthenticated { missing }, None)));
    };
    let key_hash = hash_of(key);
    let Some(caller) = keys.caller_by_hash(&key_hash) else {
        return Err(Box::new((Error::Unauthenticated { missing: false }, None)));
    };
    let scope = method_of(path).map(|method| (method, scope_of(method)));
    if let Some((method, scope)) = scope
        && !caller.may(scope)
    {
        return Err(Box::new((
            Error::MissingScope {
                caller: caller.name.clone(),
                scope: scope.as_str(),
                method: method.name(),
            },
            Some(caller.clone()),
        )));
    }
    Ok(Admitted {
        caller: caller.clone(),
        key_hash,
        scope: scope.map(|(_, s)| s),
    })
}

/// An answer that ends with UNAUTHENTICATED once its caller's key is gone or has lost the scope
/// (the key file was read again): a stream opened with a removed key stops at its next message.
struct Revocable {
    inner: tonic::body::Body,
    keys: Keys,
    key_hash: [u8; 32],
    scope: Option<Scope>,
    generation: u64,
    ended: bool,
}

impl Revocable {
    fn still_allowed(&self) -> bool {
        self.keys
            .read()
            .caller_by_hash(&self.key_hash)
            .is_some_and(|c| self.scope.is_none_or(|s| c.may(s)))
    }
}

impl Body for Revocable {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let generation = self.keys.generation.load(Ordering::SeqCst);
        if generation != self.generation {
            self.generation = generation;
            if !self.still_allowed() {
                self.ended = true;
                let status = Status::unauthenticated(
                    "the API key was removed from KABAR_API_KEYS_FILE (or lost this scope)",
                );
                let mut trailers = http::HeaderMap::new();
                if status.add_header(&mut trailers).is_err() {
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
        let generation = keys.generation.load(Ordering::SeqCst);
        let admitted =
            admit(&keys.read(), request.uri().path(), request.headers()).and_then(|admitted| {
                match self.quotas.take(&admitted.caller) {
                    Ok(()) => Ok(admitted),
                    Err(e) => Err(Box::new((e, Some(admitted.caller)))),
                }
            });
        match admitted {
            Err(refused) => {
                let (e, caller) = *refused;
                let mut response = Status::from(e).into_http::<tonic::body::Body>();
                if let Some(caller) = caller {
                    response.extensions_mut().insert(caller);
                }
                Box::pin(async move { Ok(response) })
            }
            Ok(Admitted {
                caller,
                key_hash,
                scope,
            }) => {
                request.extensions_mut().insert(caller.clone());
                let keys = keys.clone();
                Box::pin(async move {
                    let response = inner.call(request).await?;
                    let mut response = response.map(|body| {
                        tonic::body::Body::new(Revocable {
                            inner: body,
                            keys,
                            key_hash,
                            scope,
                            generation,
                            ended: false,
                        })
                    });
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
        let refused = |headers: &http::HeaderMap, path: &str| match admit(&ring, path, headers) {
            Ok(_) => panic!("admitted"),
            Err(refused) => refused.0,
        };
        assert!(matches!(
            refused(&http::HeaderMap::new(), otp),
            Error::Unauthenticated { missing: true }
        ));
        assert!(matches!(
            refused(&with("Bearer kabar_nope"), otp),
            Error::Unauthenticated { missing: false }
        ));
        assert!(matches!(
            refused(&with(&key), otp),
            Error::Unauthenticated { missing: false }
        ));
        let mut twice = with(&format!("Bearer {key}"));
        twice.append(
            http::header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        assert!(matches!(
            refused(&twice, otp),
            Error::Unauthenticated { missing: false }
        ));
        let Ok(admitted) = admit(&ring, otp, &with(&format!("bearer {key}"))) else {
            panic!("refused");
        };
        assert_eq!(admitted.caller.name, "portal");
        assert!(matches!(
            refused(&with(&format!("Bearer {key}")), notify),
            Error::MissingScope {
                scope: "notify",
                ..
            }
        ));
    }
}
