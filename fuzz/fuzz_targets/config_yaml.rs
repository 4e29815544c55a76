//! Any text as one YAML config file.
#![no_main]

use isthmus_config::SourceFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        isthmus_fuzz::check_load(&[SourceFile::new("fuzz.yaml", text)]);
    }
});
