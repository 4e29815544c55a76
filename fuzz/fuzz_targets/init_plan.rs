//! isthmus-init's flags → plan → iptables-restore text, with the invariants in
//! `isthmus_fuzz::plan`.
#![no_main]

use isthmus_fuzz::plan::{check, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| check(&input));
