//! `merchant::qr::bip21_uri`: any amount, label and message give a URI of URI characters
//! only that parses back to exactly what was put in.
#![no_main]

use merchant::qr::bip21_uri;
use api::params::percent_decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let amount_sat = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
    let flags = data[8];
    let text = String::from_utf8_lossy(&data[9..]);
    // `address \n label \n message`; addresses are alphanumeric (the function's precondition).
    let mut parts = text.splitn(3, '\n');
    let address: String = parts
        .next()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let label = parts.next().filter(|_| flags & 1 != 0);
    let message = parts.next().filter(|_| flags & 2 != 0);
    let uri = bip21_uri(&address, amount_sat, label, message);

    assert!(
        uri.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:?&=%".contains(&b)),
        "{uri:?}"
    );
    let rest = uri.strip_prefix("bitcoin:").expect("scheme");
    let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
    assert_eq!(addr, address);
    let (mut amount, mut got_label, mut got_message) = (None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').expect("key=value");
        let v = percent_decode(v).expect("valid percent-encoding of UTF-8");
        let slot = match k {
            "amount" => &mut amount,
            "label" => &mut got_label,
            "message" => &mut got_message,
            _ => panic!("unknown key {k:?} in {uri:?}"),
        };
        assert!(slot.replace(v).is_none(), "{k} twice in {uri:?}");
    }
    assert_eq!(got_label.as_deref(), label.filter(|l| !l.is_empty()));
    assert_eq!(got_message.as_deref(), message.filter(|m| !m.is_empty()));
    match amount {
        None => assert_eq!(amount_sat, 0),
        Some(a) => {
            assert!(
                !a.contains(['e', 'E']) && !a.ends_with('0') || !a.contains('.'),
                "{a}"
            );
            assert_eq!(api::decimal::parse_units(&a, 8), Ok(amount_sat), "{a}");
        }
    }
});
