//! The drain signal every listener and connection watches. Shutdown goes through three
//! phases: serving; draining (readiness fails, inbound listeners close, outbound keeps
//! working so the app can finish its calls); closing (the drain timeout passed or nothing is
//! left: listeners close and every connection ends now).

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    Closing,
}

/// Owned by the control thread; moves the phase forward.
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<Phase>,
}

/// A handle each accept loop and connection task holds.
#[derive(Debug, Clone)]
pub struct Watch {
    rx: watch::Receiver<Phase>,
}

impl Drain {
    pub fn new() -> Self {
        Drain {
            tx: watch::Sender::new(Phase::Serving),
        }
    }

    pub fn watch(&self) -> Watch {
        Watch {
            rx: self.tx.subscribe(),
        }
    }

    /// Moves to `phase` (never backwards).
    pub fn advance(&self, phase: Phase) {
        self.tx.send_if_modified(|current| {
            if phase > *current {
                *current = phase;
                true
            } else {
                false
            }
        });
    }

    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Watch {
    /// Completes once the phase is at least `phase` (at once if it already is). Cancel-safe.
    pub async fn reached(&mut self, phase: Phase) {
        // An error means the Drain was dropped: the process is ending, treat it as closing.
        let _ = self.rx.wait_for(|p| *p >= phase).await;
    }

    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward_and_wake_watchers() {
        let drain = Drain::new();
        let mut w = drain.watch();
        let waiter = tokio::spawn(async move {
            w.reached(Phase::Closing).await;
            w.phase()
        });
        drain.advance(Phase::Draining);
        drain.advance(Phase::Serving);
        assert_eq!(drain.phase(), Phase::Draining);
        drain.advance(Phase::Closing);
        assert_eq!(waiter.await.unwrap(), Phase::Closing);
        // Already reached: returns at once.
        drain.watch().reached(Phase::Draining).await;
    }
}
