//! A node's config file: every section parsed and validated.
#![no_main]

use canopy::config::{LimitsConfig, StreamConfig};
use canopy::consensus::RaftConfig;
use canopy::overlay::OverlayConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = toml::from_str::<StreamConfig>(text) {
        if s.validate().is_ok() {
            let _ = s.transport();
            let _ = s.memory_needed();
            let _ = s.replica();
        }
    }
    if let Ok(l) = toml::from_str::<LimitsConfig>(text) {
        let _ = l.validate();
    }
    if let Ok(o) = toml::from_str::<OverlayConfig>(text) {
        let _ = o.validate();
    }
    if let Ok(r) = toml::from_str::<RaftConfig>(text) {
        let _ = r.validate();
    }
    if let Ok(v) = toml::from_str::<toml::Value>(text) {
        for section in ["stream", "limits"] {
            if let Some(t) = v.get(section) {
                let _ = t.clone().try_into::<StreamConfig>().map(|s| s.validate());
                let _ = t.clone().try_into::<LimitsConfig>().map(|l| l.validate());
            }
        }
    }
});
