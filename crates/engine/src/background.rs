//! Background tasks whose failure must not take the agent down.
//!
//! The launcher's panic hook ends the whole process on a panic (its guardian
//! then stops every worker): right for the agent's own loop, whose state a
//! panic leaves unknown, wrong for a side job such as a stack capture or one
//! HTTP connection, whose panic would kill a healthy job. A task spawned
//! here marks its thread while it is polled; the hook asks
//! [`in_background`] and, inside one, lets the panic unwind into tokio,
//! which ends that task only: its [`tokio::task::JoinHandle`] then yields
//! an error, which the caller turns into an answer ("no stack").

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    static IN_BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is polling a background task now.
pub fn in_background() -> bool {
    IN_BACKGROUND.with(Cell::get)
}

/// Spawns `fut` as a background task: a panic inside it ends this task
/// only (its handle yields `Err`), never the launcher. The task runs to its
/// end even if the handle is dropped.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(Background {
        inner: Box::pin(fut),
    })
}

struct Background<F> {
    inner: Pin<Box<F>>,
}

/// Restores the flag on the way out of a poll, unwinding included.
struct Mark(bool);

impl Drop for Mark {
    fn drop(&mut self) {
        IN_BACKGROUND.with(|c| c.set(self.0));
    }
}

impl<F: Future> Future for Background<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _mark = Mark(IN_BACKGROUND.with(|c| c.replace(true)));
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_panicking_task_yields_an_error_and_the_flag_is_cleared() {
        let h = super::spawn(async {
            assert!(super::in_background());
            panic!("boom");
        });
        assert!(h.await.is_err());
        assert!(!super::in_background());
        let ok = super::spawn(async { 7 }).await.unwrap();
        assert_eq!(ok, 7);
    }
}
