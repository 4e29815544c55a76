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
