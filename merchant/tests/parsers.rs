//! Parser-level property tests of merchant payments, the normal-suite companions of the
//! cargo-fuzz targets in `fuzz/` (`webhook_signature`, `bip21`): same parsers, same properties,
//! random inputs from proptest. (Moved from `api/tests/parsers.rs` with the crate split.)

use merchant::webhook::{signature_header, verify};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn webhook_verify_never_panics_and_accepts_only_the_hmac(
        header in prop_oneof!["\\PC{0,100}", "t=[0-9]{1,3},v1=[0-9a-f]{64}(,[a-z0-9]{1,3}=[!-~]{1,8}){0,2}"],
        body in proptest::collection::vec(any::<u8>(), 0..32),
        secret in proptest::collection::vec(any::<u8>(), 0..32),
        now in 0u64..1_000,
    ) {
        if verify(&secret, &header, &body, now, u64::MAX).is_ok() {
            let t: u64 = header.split(',').find_map(|e| e.strip_prefix("t=")).unwrap().parse().unwrap();
            let own = signature_header(&secret, t, &body);
            let v1 = own.split_once(",v1=").unwrap().1;
            let want = format!("v1={v1}");
            prop_assert!(header.split(',').any(|e| e == want));
        }
        let own = signature_header(&secret, now, &body);
        prop_assert_eq!(verify(&secret, &own, &body, now, 0), Ok(()));
    }
}
