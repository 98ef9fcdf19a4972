//! The YAML configuration files (pipelines/src/config.rs) on any text: `TcpcopyFile` and
//! `InterceptFile` parse and check (`ConfigFile::from_yaml`); an accepted file turns into flag
//! defaults (`settings`) and back into YAML that parses to the same file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelines::config::{ConfigFile, InterceptFile, TcpcopyFile};

fn check<F: ConfigFile + PartialEq + std::fmt::Debug>(text: &str) {
    let Ok(file) = F::from_yaml(text) else {
        return;
    };
    for setting in file.settings() {
        assert!(!setting.key.is_empty() && !setting.id.is_empty());
    }
    let yaml = file.to_yaml().expect("an accepted file serializes");
    let again = F::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("the YAML of an accepted file is refused: {e}\n{yaml}"));
    assert_eq!(again, file);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check::<TcpcopyFile>(text);
    check::<InterceptFile>(text);
});
