//! The signed request parser (`api::params`): query and body together, percent-decoding,
//! duplicate names, the parameter limits, and the split of the signed bytes from the signature.
//! Checked against a small reference model of the rules; never a panic.
#![no_main]

use api::params::{parse_signed, percent_decode, signed_payload, split_signature, Params};
use libfuzzer_sys::fuzz_target;

#[path = "../../api/tests/model/params.rs"]
mod params_model;

use params_model::{encode_all, params_model as model};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (query, body) = text.split_once('\n').unwrap_or((&text, ""));

    // percent_decode inverts percent-encoding, and never grows its input.
    if let Some(decoded) = percent_decode(query) {
        assert!(decoded.len() <= query.len());
        assert_eq!(
            percent_decode(&encode_all(&decoded)).as_deref(),
            Some(&*decoded)
        );
    }

    match (Params::parse(query, body), model(query, body)) {
        (Ok(mut p), Ok(pairs)) => {
            for (k, v) in &pairs {
                assert!(p.has(k));
                match p.opt(k) {
                    Ok(got) => assert_eq!(got.as_deref(), Some(v.as_str())),
                    Err(e) => assert!(v.is_empty() && e.code == -1105, "{k}: {}", e.msg),
                }
            }
            p.finish().expect("every parameter was read");
        }
        (Err(e), Err(code)) => assert_eq!(e.code, code, "{query:?} {body:?}: {}", e.msg),
        (got, want) => panic!("{query:?} {body:?}: parser {:?}, model {want:?}", got.err()),
    }

    // split_signature keeps the exact bytes of everything else.
    for raw in [query, body] {
        let (rest, sig) = split_signature(raw);
        if sig.is_none() {
            assert_eq!(rest, raw);
        }
        assert!(rest.len() <= raw.len());
    }

    // A signed request: the signature the HMAC is checked against is the one parameter named
    // `signature` that the parser saw (so it is never also part of the signed bytes).
    if let Ok((mut p, _ts, _recv)) = parse_signed(query, body) {
        if let (Ok(sig_param), Some((payload, sig))) =
            (p.req("signature"), signed_payload(query, body))
        {
            assert_eq!(percent_decode(&sig).as_deref(), Some(sig_param.as_str()));
            assert!(payload.len() + "signature=".len() + sig.len() <= query.len() + body.len());
        }
    }
});
