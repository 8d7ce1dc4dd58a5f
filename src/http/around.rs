//! Middleware as a plain "before / after" pair: [`Around`] and its tower layer.
//!
//! `axum::middleware::from_fn` is the easiest way to write a layer, but each one costs every
//! request a clone of the whole inner service stack, two boxed services and a boxed future. With
//! four such layers that was about a third of relay's CPU for a small `POST` (docs/performance.md,
//! issue 15). The layers here do their work synchronously on the way in ([`Around::before`]) and
//! on the way out ([`Around::after`]) and wrap the inner future in a named one, so a layer costs
//! a request no allocation of its own (a response body that is not yet axum's `Body` is boxed
//! into one, as `from_fn` does too). Whatever needs to wait on the way out (reading a body) says
//! so with [`After::Later`], boxed only then.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    body::{Body, Bytes},
    extract::Request,
    response::Response,
};

/// A middleware's work around the inner service.
pub trait Around: Clone + Send + Sync + 'static {
    /// What [`Around::before`] hands to [`Around::after`].
    type Carry: Send + 'static;

    /// On the way in. `Err` answers at once, without calling the inner service.
    #[expect(
        clippy::result_large_err,
        reason = "a refusal is the rare path; boxing it would only move the size elsewhere"
    )]
    fn before(&self, req: &mut Request) -> Result<Self::Carry, Response>;

    /// On the way out.
    fn after(&self, carry: Self::Carry, res: Response) -> After;

    /// Runs the inner service's `call` and every poll of its future (not a [`After::Later`]
    /// one), e.g. inside a task-local's scope. By default just `f()`.
    fn scope<R>(&self, _carry: &Self::Carry, f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// What [`Around::after`] came to.
pub enum After {
    Ready(Response),
    /// The response once this future is done (polled within the outer layers' scopes).
    Later(Pin<Box<dyn Future<Output = Response> + Send>>),
}

/// The tower layer of an [`Around`].
#[derive(Clone)]
pub struct AroundLayer<A>(pub A);

impl<A: Around, S> tower::Layer<S> for AroundLayer<A> {
    type Service = AroundService<A, S>;

    fn layer(&self, inner: S) -> Self::Service {
        AroundService {
            around: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct AroundService<A, S> {
    around: A,
    inner: S,
}

impl<A, S, B> tower::Service<Request> for AroundService<A, S>
where
    A: Around,
    S: tower::Service<Request, Response = axum::http::Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = AroundFuture<A, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let stage = match self.around.before(&mut req) {
            Ok(carry) => {
                let inner = &mut self.inner;
                let fut = self.around.scope(&carry, || inner.call(req));
                Stage::Inner {
                    fut,
                    carry: Some(carry),
                }
            }
            Err(res) => Stage::Ready { res: Some(res) },
        };
        AroundFuture {
            around: self.around.clone(),
            stage,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct AroundFuture<A: Around, F> {
        around: A,
        #[pin]
        stage: Stage<A::Carry, F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StageProj]
    enum Stage<C, F> {
        Inner { #[pin] fut: F, carry: Option<C> },
        Later { fut: Pin<Box<dyn Future<Output = Response> + Send>> },
        Ready { res: Option<Response> },
    }
}

const POLLED_AFTER_DONE: &str = "an AroundFuture was polled after it completed";

impl<A, F, B> Future for AroundFuture<A, F>
where
    A: Around,
    F: Future<Output = Result<axum::http::Response<B>, Infallible>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.stage.as_mut().project() {
                StageProj::Inner { fut, carry } => {
                    let Some(scope) = carry.as_ref() else {
                        panic!("{POLLED_AFTER_DONE}");
                    };
                    let res = match this.around.scope(scope, || fut.poll(cx)) {
                        // Inner layers may have wrapped the body (tracing, panics): one body type
                        // out, as `from_fn` does.
                        Poll::Ready(Ok(res)) => res.map(Body::new),
                        Poll::Ready(Err(never)) => match never {},
                        Poll::Pending => return Poll::Pending,
                    };
                    let Some(carry) = carry.take() else {
                        panic!("{POLLED_AFTER_DONE}");
                    };
                    match this.around.after(carry, res) {
                        After::Ready(res) => Stage::Ready { res: Some(res) },
                        After::Later(fut) => Stage::Later { fut },
                    }
                }
                StageProj::Later { fut } => match fut.as_mut().poll(cx) {
                    Poll::Ready(res) => Stage::Ready { res: Some(res) },
                    Poll::Pending => return Poll::Pending,
                },
                StageProj::Ready { res } => match res.take() {
                    Some(res) => return Poll::Ready(Ok(res)),
                    None => panic!("{POLLED_AFTER_DONE}"),
                },
            };
            this.stage.set(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{http::StatusCode, routing::get};
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use tower::ServiceExt;

    tokio::task_local! {
        static SEEN: usize;
    }

    /// Counts requests on the way in, refuses `/no`, tags responses on the way out (later for
    /// `/later`), and scopes the handler in a task-local.
    #[derive(Clone, Default)]
    struct Probe(Arc<AtomicUsize>);

    impl Around for Probe {
        type Carry = usize;

        fn before(&self, req: &mut Request) -> Result<usize, Response> {
            if req.uri().path() == "/no" {
                return Err((StatusCode::FORBIDDEN, "refused").into_response());
            }
            Ok(self.0.fetch_add(1, Ordering::Relaxed) + 1)
        }

        fn after(&self, carry: usize, mut res: Response) -> After {
            res.headers_mut().insert("x-seen", carry.into());
            if res.status() == StatusCode::ACCEPTED {
                return After::Later(Box::pin(async move {
                    tokio::task::yield_now().await;
                    res.headers_mut().insert("x-later", 1.into());
                    res
                }));
            }
            After::Ready(res)
        }

        fn scope<R>(&self, carry: &usize, f: impl FnOnce() -> R) -> R {
            SEEN.sync_scope(*carry, f)
        }
    }

    use axum::response::IntoResponse;

    async fn send(app: &axum::Router, path: &str) -> Response {
        let req = Request::builder().uri(path).body(Body::empty());
        match app.clone().oneshot(req.expect("a request")).await {
            Ok(res) => res,
            Err(never) => match never {},
        }
    }

    #[tokio::test]
    async fn before_and_after_run_once_around_the_handler_in_its_scope() {
        let probe = Probe::default();
        let app = axum::Router::new()
            .route(
                "/",
                get(|| async {
                    tokio::task::yield_now().await;
                    SEEN.with(|n| n.to_string())
                }),
            )
            .route("/later", get(|| async { StatusCode::ACCEPTED }))
            .route("/no", get(|| async { "unreachable" }))
            .layer(AroundLayer(probe.clone()));

        let res = send(&app, "/").await;
        assert_eq!(res.headers()["x-seen"], "1");
        let body = axum::body::to_bytes(res.into_body(), 64).await;
        assert_eq!(body.expect("a body"), "1", "the handler ran in the scope");

        let res = send(&app, "/later").await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(res.headers()["x-seen"], "2");
        assert_eq!(res.headers()["x-later"], "1");

        let res = send(&app, "/no").await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert!(res.headers().get("x-seen").is_none());
        assert_eq!(
            probe.0.load(Ordering::Relaxed),
            2,
            "a refusal never reaches after"
        );
    }
}
