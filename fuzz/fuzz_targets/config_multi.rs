//! Several config files at once, YAML and JSON mixed, names possibly repeated: exercises the
//! cross-file checks (duplicate names, routes to services defined elsewhere).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    isthmus_fuzz::check_load(&isthmus_fuzz::split_files(data));
});
