//! Property tests of the decoder: random and mutated frames never panic, a
//! frame's every proper prefix is "incomplete", and encode/decode round-trip.

use proptest::prelude::*;
use tcpstore::codec::{self, Limits, Request};

fn small_limits() -> Limits {
    Limits {
        max_key_len: 64,
        max_value_len: 256,
        max_keys: 16,
        max_frame_len: 4096,
    }
}

fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    let key = proptest::collection::vec(any::<u8>(), 0..32);
    let val = proptest::collection::vec(any::<u8>(), 0..128);
    let keys = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 0..8);
    prop_oneof![
        (key.clone(), val.clone()).prop_map(|(k, v)| enc(&Request::Set { key: &k, value: &v })),
        (key.clone(), val.clone(), val.clone()).prop_map(|(k, e, d)| enc(&Request::CompareSet {
            key: &k,
            expected: &e,
            desired: &d
        })),
        (key.clone(), any::<i64>()).prop_map(|(k, d)| enc(&Request::Add { key: &k, delta: d })),
        keys.clone().prop_map(|ks| {
            let mut o = vec![];
            codec::encode_keys(codec::code::WAIT, &ks, &mut o);
            o
        }),
        keys.clone().prop_map(|ks| {
            let mut o = vec![];
            codec::encode_keys(codec::code::MULTI_GET, &ks, &mut o);
            o
        }),
        keys.prop_map(|ks| {
            let pairs: Vec<_> = ks.iter().map(|k| (k.clone(), k.clone())).collect();
            let mut o = vec![];
            codec::encode_multi_set(&pairs, &mut o);
            o
        }),
        (key.clone(), any::<i64>()).prop_map(|(k, w)| enc(&Request::Barrier {
            key: &k,
            world_size: w
        })),
        any::<u32>().prop_map(|n| enc(&Request::Ping { nonce: n })),
        key.prop_map(|k| enc(&Request::QueuePop { key: &k })),
    ]
}

fn enc(r: &Request<'_>) -> Vec<u8> {
    let mut o = vec![];
    codec::encode(r, &mut o);
    o
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode(&bytes, &small_limits());
        let _ = codec::decode(&bytes, &Limits::default());
    }

    #[test]
    fn valid_frames_round_trip_and_prefixes_are_incomplete(frame in arb_frame()) {
        let limits = Limits::default();
        let (req, n) = codec::decode(&frame, &limits).unwrap().unwrap();
        prop_assert_eq!(n, frame.len());
        prop_assert_eq!(enc(&req), frame.clone());
        for cut in 0..frame.len() {
            prop_assert_eq!(codec::decode(&frame[..cut], &limits), Ok(None));
        }
    }

    #[test]
    fn mutated_frames_never_panic(frame in arb_frame(), pos in any::<usize>(), byte in any::<u8>(), extra in proptest::collection::vec(any::<u8>(), 0..16)) {
        let mut f = frame;
        if !f.is_empty() {
            let i = pos % f.len();
            f[i] = byte;
        }
        f.extend(extra);
        if let Ok(Some((_, n))) = codec::decode(&f, &small_limits()) {
            prop_assert!(n <= f.len());
        }
    }
}
