//! Any bytes a client can send, fed to the store's frame decoder exactly as
//! a connection does (decode, consume, repeat). It must never panic, never
//! claim more bytes than it was given, and whatever it decodes must encode
//! back to the very bytes it came from.
//!
//! Run: `cargo +nightly fuzz run store_codec` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpstore::codec::{decode, encode, Limits};

fuzz_target!(|data: &[u8]| {
    // Small limits too, so that the limit checks themselves are exercised.
    for limits in [
        Limits::default(),
        Limits {
            max_key_len: 16,
            max_value_len: 64,
            max_keys: 4,
            ..Limits::default()
        },
    ] {
        let mut used = 0;
        while let Ok(Some((req, n))) = decode(&data[used..], &limits) {
            assert!(n > 0 && used + n <= data.len());
            let mut again = Vec::new();
            encode(&req, &mut again);
            assert_eq!(again, &data[used..used + n], "{req:?}");
            used += n;
        }
    }
});
