//! Test helpers for the proxy's unit tests.

/// True (and the test recorded as skipped, see `isthmus_tests::skip`) when io_uring is
/// unavailable here, so an io_uring test must not run.
pub fn skip_unless_io_uring() -> bool {
    match crate::runtime::select(crate::runtime::BackendChoice::IoUring) {
        Ok(_) => false,
        Err(e) => {
            isthmus_tests::skip(&e.to_string());
            true
        }
    }
}

/// Runs `body` on one worker of backend `R`, waits for it and returns what it returned; a
/// panic inside fails the test.
pub fn on_worker<R, F, Fut, T>(body: F) -> T
where
    R: crate::runtime::Runtime,
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Arc::new(std::sync::Mutex::new(tx));
    let handles = crate::runtime::start_workers(
        R::BACKEND,
        1,
        move |_| {
            let (body, tx) = (body.clone(), tx.clone());
            async move {
                let value = body().await;
                let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(value);
            }
        },
        |_, _| {},
    )
    .expect("worker");
    for h in handles {
        h.join().expect("worker panicked");
    }
    rx.recv().expect("the worker returned nothing")
}
