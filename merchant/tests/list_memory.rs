//! How much memory a Greenfield invoice list holds: one test alone in its binary, so the heap
//! it measures (a counting global allocator) is its own.
//!
//! Defect (review): `GET /api/v1/stores/{id}/invoices?skip=&take=` read the first `skip + take`
//! matching invoices into memory (up to 10,000, each with up to 32 KiB of metadata, ~330 MB)
//! and cut the page asked for from them; a few such requests at once, from a plugin's ordinary
//! token, could take gigabytes. Now one page of the list and the `take` kept are held.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::Harness;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

/// The heap, counted (current and peak).
#[global_allocator]
static HEAP: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

async fn get(h: &Harness, uri: &str, token: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method("GET")
        .uri(uri)
        .header("authorization", format!("token {token}"))
        .body(Body::empty())
        .unwrap();
    let res = h.router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_far_into_the_invoice_list_holds_one_page_not_all_before_it() {
    let h = Harness::new();
    h.state
        .set_custody(Arc::new(common::custody::Fake::default()))
        .ok()
        .unwrap();
    let (account, _) = h.trader("0", "0").await;
    let created = h
        .state
        .create_key(
            account,
            api::keys::Perms::parse("read,merchant").unwrap(),
            "gf",
        )
        .unwrap();
    let token = h.state.greenfield_token(&created.0);
    let store = get(&h, "/api/v1/stores", &token).await.1[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // 600 invoices of ~30 KiB of metadata each (~18 MB), two order ids between them.
    let filler = "x".repeat(30 * 1024);
    for i in 0..600u32 {
        let order = if i % 2 == 0 { "even" } else { "odd" };
        let body = json!({"amount": "0.001", "currency": "BTC",
                          "metadata": {"orderId": order, "n": i, "filler": filler}});
        let req = Request::builder()
            .method("POST")
            .uri(format!("/api/v1/stores/{store}/invoices"))
            .header("authorization", format!("token {token}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let res = h.router.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "invoice {i}");
    }
    for uri in [
        format!("/api/v1/stores/{store}/invoices?skip=500&take=10"),
        format!("/api/v1/stores/{store}/invoices?orderId=even&orderId=odd&skip=500&take=10"),
    ] {
        let before = HEAP.current_usage();
        HEAP.reset_peak_usage();
        let (status, v) = get(&h, &uri, &token).await;
        let held = HEAP.peak_usage().saturating_sub(before);
        assert_eq!(status, StatusCode::OK, "{v}");
        // The 501st to 510th newest: numbers 99 down to 90.
        let got: Vec<u64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["n"].as_u64().unwrap())
            .collect();
        assert_eq!(got, (90..100).rev().collect::<Vec<_>>(), "{uri}");
        // 510 records held would be ~15 MB; a page of 100 and the 10 kept, ~3.3 MB, and the
        // answer's JSON.
        assert!(
            held < 8 * 1024 * 1024,
            "{uri}: {held} bytes held at the peak"
        );
    }
    // The end of the list, and past the 10,000 listed.
    let (_, v) = get(
        &h,
        &format!("/api/v1/stores/{store}/invoices?skip=595&take=10"),
        &token,
    )
    .await;
    assert_eq!(v.as_array().unwrap().len(), 5);
    let (_, v) = get(
        &h,
        &format!("/api/v1/stores/{store}/invoices?skip=10000&take=10"),
        &token,
    )
    .await;
    assert_eq!(v, json!([]));
}
