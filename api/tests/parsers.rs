//! Parser-level property tests, the normal-suite companions of the cargo-fuzz targets in `fuzz/`
//! (same parsers, same properties, random inputs from proptest), and a named regression test for
//! each defect the fuzzers found.

use api::decimal::{format_units, format_units_u128, parse_units, MAX_LEN};
use api::params::{parse_signed, percent_decode, signed_payload, split_signature, Params};
use api::ws::{
    parse_api_request, parse_control, parse_stream_name, ws_api_signed_payload, Control,
    ControlError, MarketStream, StreamName,
};
#[path = "model/params.rs"]
mod params_model;

use params_model::{encode_all, params_model};
use proptest::prelude::*;
use serde_json::{json, Value};

/// A query-string-like text: names and values from a small alphabet with escapes, so that
/// duplicates, `signature` and bad escapes come up often.
fn raw_params() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("signature".to_owned()),
        Just("sig%6Eature".to_owned()),
        Just("timestamp".to_owned()),
        Just("recvWindow".to_owned()),
        "[a-c]{1,2}",
        "[a-z%0-9+-]{0,6}",
    ];
    let value = prop_oneof!["[0-9a-f]{0,8}", "[a-z%0-9+=&é]{0,8}", Just(String::new())];
    proptest::collection::vec((name, proptest::option::of(value)), 0..6).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k,
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn params_follow_the_rules(query in raw_params(), body in raw_params()) {
        match (Params::parse(&query, &body), params_model(&query, &body)) {
            (Ok(mut p), Ok(pairs)) => {
                for (k, v) in &pairs {
                    prop_assert!(p.has(k));
                    match p.opt(k) {
                        Ok(got) => prop_assert_eq!(got.as_deref(), Some(v.as_str())),
                        Err(e) => prop_assert!(v.is_empty() && e.code == -1105),
                    }
                }
                prop_assert!(p.finish().is_ok());
            }
            (Err(e), Err(code)) => prop_assert_eq!(e.code, code),
            (got, want) => prop_assert!(false, "parser {:?}, model {:?}", got.err(), want),
        }
    }

    #[test]
    fn params_never_panic_on_any_text(query in "\\PC{0,40}", body in "\\PC{0,40}") {
        let _ = Params::parse(&query, &body);
        let _ = parse_signed(&query, &body);
        let _ = signed_payload(&query, &body);
    }

    #[test]
    fn percent_decode_inverts_encoding(s in "\\PC{0,20}") {
        prop_assert_eq!(percent_decode(&encode_all(&s)), Some(s.clone()));
        if let Some(d) = percent_decode(&s) {
            prop_assert!(d.len() <= s.len());
        }
    }

    #[test]
    fn the_signature_checked_is_the_one_parameter_named_signature(
        query in raw_params(),
        body in raw_params(),
    ) {
        for raw in [&query, &body] {
            let (rest, sig) = split_signature(raw);
            if sig.is_none() {
                prop_assert_eq!(&rest, raw);
            }
        }
        if let Ok((mut p, _, _)) = parse_signed(&query, &body) {
            if let (Ok(param), Some((payload, sig))) = (p.req("signature"), signed_payload(&query, &body)) {
                prop_assert_eq!(percent_decode(&sig), Some(param));
                prop_assert!(payload.len() + "signature=".len() + sig.len() <= query.len() + body.len());
            }
        }
    }

    #[test]
    fn decimals_round_trip_for_any_decimals(v: u64, d: u8) {
        let s = format_units(v, d);
        if s.len() <= MAX_LEN {
            prop_assert_eq!(parse_units(&s, d), Ok(v));
        }
        let wide = format_units_u128(u128::from(v) << 64 | u128::from(v), d);
        if d > 0 {
            prop_assert_eq!(wide.split_once('.').map(|(_, f)| f.len()), Some(usize::from(d)));
        }
    }

    #[test]
    fn control_requests_parse_without_state(
        method in prop_oneof![Just("SUBSCRIBE"), Just("UNSUBSCRIBE"), Just("LIST_SUBSCRIPTIONS"), Just("subscribe"), Just("")],
        names in proptest::collection::vec("[a-z@_0-9]{0,16}", 0..4),
        id in proptest::option::of(any::<u32>()),
    ) {
        let mut req = json!({"method": method, "params": names});
        if let Some(id) = id {
            req["id"] = json!(id);
        }
        let (got_id, control) = parse_control(&req.to_string());
        prop_assert_eq!(got_id, id.map_or(Value::Null, |i| json!(i)));
        let want = match method {
            "SUBSCRIBE" => Ok(Control::Subscribe(names.clone())),
            "UNSUBSCRIBE" => Ok(Control::Unsubscribe(names.clone())),
            "LIST_SUBSCRIPTIONS" => Ok(Control::List),
            _ => Err(ControlError { code: 2, msg: "Invalid request: unknown method" }),
        };
        prop_assert_eq!(control, want);
        for name in &names {
            match parse_stream_name(name) {
                None => prop_assert!(name.contains('@')),
                Some(StreamName::ListenKey(k)) => prop_assert_eq!(k, name.as_str()),
                Some(StreamName::AllTickers { mini }) => prop_assert_eq!(
                    name.as_str(),
                    if mini { "!miniTicker@arr" } else { "!ticker@arr" }
                ),
                Some(StreamName::Market { symbol, .. }) => {
                    prop_assert_eq!(Some(symbol), name.split_once('@').map(|(s, _)| s));
                }
            }
        }
    }

    #[test]
    fn ws_parsers_never_panic_on_any_text(text in "\\PC{0,60}") {
        let (_, control) = parse_control(&text);
        if serde_json::from_str::<Value>(&text).is_err() {
            prop_assert_eq!(control, Err(ControlError { code: 3, msg: "Invalid JSON" }));
        }
        if let Ok(req) = parse_api_request(&text) {
            let _ = ws_api_signed_payload(&req.params);
        }
        let _ = parse_stream_name(&text);
    }

    #[test]
    fn ws_api_signs_every_other_parameter_in_name_order(
        params in proptest::collection::btree_map("[a-zA-Z]{1,8}", prop_oneof![
            "[ -~]{0,8}".prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
        ], 0..6),
        sig in "[0-9a-f]{64}",
    ) {
        let mut obj: serde_json::Map<String, Value> = params.clone().into_iter().collect();
        obj.insert("signature".into(), Value::from(sig.clone()));
        let (payload, got_sig) = ws_api_signed_payload(&obj).expect("scalar parameters");
        prop_assert_eq!(got_sig, sig.as_str());
        let want: Vec<String> = params
            .iter()
            .filter(|(k, _)| *k != "signature")
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        prop_assert_eq!(payload, want.join("&"));
    }
}

#[test]
fn stream_names_parse_to_their_kind() {
    let cases: &[(&str, Option<StreamName<'_>>)] = &[
        (
            "btcusd@depth",
            Some(StreamName::Market {
                symbol: "btcusd",
                kind: MarketStream::Diff,
            }),
        ),
        (
            "btcusd@depth5@100ms",
            Some(StreamName::Market {
                symbol: "btcusd",
                kind: MarketStream::Partial {
                    levels: 5,
                    every_ms: 100,
                },
            }),
        ),
        ("btcusd@depth7", None),
        ("btcusd@depth5@10ms", None),
        (
            "btcusd@kline_1m",
            Some(StreamName::Market {
                symbol: "btcusd",
                kind: MarketStream::Kline {
                    interval: api::readmodel::interval_index("1m").expect("1m"),
                },
            }),
        ),
        ("btcusd@kline_2m", None),
        (
            "btcusd@miniTicker",
            Some(StreamName::Market {
                symbol: "btcusd",
                kind: MarketStream::Ticker { mini: true },
            }),
        ),
        ("abcdef", Some(StreamName::ListenKey("abcdef"))),
        ("@", None),
    ];
    for (name, want) in cases {
        assert_eq!(parse_stream_name(name), *want, "{name}");
    }
}

/// Found by the `decimal` fuzz target: `format_units_u128` computed `10^decimals` in a `u128`,
/// which overflows above 38 decimals (a panic in debug builds; in release a wrong scale, and a
/// division by zero from 128 decimals on).
#[test]
fn format_units_is_total_for_any_number_of_decimals() {
    assert_eq!(format_units_u128(5, 40), format!("0.{}5", "0".repeat(39)));
    assert_eq!(
        format_units(u64::MAX, 128),
        format!("0.{}{}", "0".repeat(128 - 20), u64::MAX)
    );
    let s = format_units_u128(u128::MAX, 255);
    assert_eq!(s.len(), 1 + 1 + 255);
    assert_eq!(s.trim_start_matches(['0', '.']), u128::MAX.to_string());
    assert_eq!(format_units(1, 38), format!("0.{}1", "0".repeat(37)));
}
