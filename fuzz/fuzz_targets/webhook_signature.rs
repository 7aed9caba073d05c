//! `merchant::webhook::verify`: any header, body, secret and clock never panic; a header
//! that verifies carries the body's HMAC; the signer's own header always verifies.
#![no_main]

use merchant::webhook::{signature_header, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 18 {
        return;
    }
    let now = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
    let tolerance = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    let secret_len = usize::from(data[16]).min(data.len() - 17);
    let secret = &data[17..17 + secret_len];
    let rest = &data[17 + secret_len..];
    // The rest is `header \n body`.
    let (header, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let header = String::from_utf8_lossy(header);
    if verify(secret, &header, body, now, tolerance).is_ok() {
        // Only the right HMAC for this secret, body and timestamp passes.
        let t: u64 = header
            .split(',')
            .find_map(|e| e.strip_prefix("t="))
            .expect("a verified header has a timestamp")
            .parse()
            .expect("decimal seconds");
        let want = signature_header(secret, t, body);
        let (_, v1) = want.split_once(",v1=").expect("v1");
        assert!(
            header.split(',').any(|e| e == format!("v1={v1}")),
            "{header:?} verified without the right signature"
        );
        assert!(t.abs_diff(now) <= tolerance);
    }
    // The signer's own header verifies at its time, and not under another secret.
    let own = signature_header(secret, now, body);
    assert_eq!(verify(secret, &own, body, now, 0), Ok(()));
    let mut other = secret.to_vec();
    other.push(0x5a);
    assert!(verify(&other, &own, body, now, tolerance).is_err());
});
