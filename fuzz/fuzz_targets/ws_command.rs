//! The WebSocket command parsers (`api::ws`): market-data control requests (`SUBSCRIBE` /
//! `UNSUBSCRIBE` / `LIST_SUBSCRIPTIONS`), stream names, and WebSocket API requests with their
//! signed payload. Never a panic; what is parsed is consistent with the text.
#![no_main]

use api::ws::{
    parse_api_request, parse_control, parse_stream_name, ws_api_signed_payload, Control,
    MarketStream, StreamName,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn check_name(name: &str) {
    match parse_stream_name(name) {
        None => assert!(name.contains('@')),
        Some(StreamName::ListenKey(k)) => assert_eq!(k, name),
        Some(StreamName::AllTickers { mini }) => {
            assert_eq!(
                name,
                if mini {
                    "!miniTicker@arr"
                } else {
                    "!ticker@arr"
                }
            )
        }
        Some(StreamName::Market { symbol, kind }) => {
            let (s, rest) = name.split_once('@').expect("a market stream has '@'");
            assert_eq!(s, symbol);
            match kind {
                MarketStream::Partial { levels, every_ms } => {
                    assert!(matches!(levels, 5 | 10 | 20) && matches!(every_ms, 100 | 1000));
                    assert!(rest.starts_with("depth"));
                }
                MarketStream::Kline { interval } => {
                    assert!(interval < api::readmodel::INTERVALS.len());
                    assert_eq!(
                        rest.strip_prefix("kline_"),
                        Some(api::readmodel::INTERVALS[interval].0)
                    );
                }
                MarketStream::Diff => assert!(rest.starts_with("depth")),
                MarketStream::Trade
                | MarketStream::AggTrade
                | MarketStream::AvgPrice
                | MarketStream::BookTicker
                | MarketStream::Ticker { .. } => {}
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    let json: Option<Value> = serde_json::from_str(&text).ok();
    let (id, control) = parse_control(&text);
    match (&json, &control) {
        (None, Err(e)) => assert_eq!((e.code, id), (3, Value::Null)),
        (None, Ok(c)) => panic!("{c:?} from text that is not JSON"),
        (Some(v), _) => assert_eq!(&id, v.get("id").unwrap_or(&Value::Null)),
    }
    if let Ok(Control::Subscribe(names) | Control::Unsubscribe(names)) = &control {
        for name in names {
            check_name(name);
        }
    }
    // Any text as a stream name, too (what `/stream?streams=` and `/ws/<names>` pass).
    for name in text.split('/') {
        check_name(name);
    }

    match parse_api_request(&text) {
        Err(e) => {
            assert!(json.is_none());
            assert_eq!(e.code, -1100);
        }
        Ok(req) => {
            assert!(json.is_some());
            if let Ok((payload, sig)) = ws_api_signed_payload(&req.params) {
                assert_eq!(
                    req.params.get("signature").and_then(Value::as_str),
                    Some(sig)
                );
                // Every other parameter is signed, in name order.
                let names: Vec<&String> = req.params.keys().filter(|k| *k != "signature").collect();
                let mut at = 0;
                for k in names {
                    let found = payload[at..].find(&format!("{k}=")).map(|i| i + at);
                    assert!(found.is_some(), "{k} not signed in order: {payload:?}");
                    at = found.expect("found") + k.len() + 1;
                }
            }
        }
    }
});
