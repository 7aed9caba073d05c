//! The liabilities tree: honest proofs verify; dishonest ones (an account left out, a sum
//! inflated or deflated at a node, a wrong nonce or balance) fail; bad files give a clear error
//! with a stable code, never a panic.

use reserves::liabilities::{self, InclusionProof, Node, Slot, Tree, VerifyError};

const SECRET: [u8; 32] = [0x42; 32];

fn snapshot() -> Vec<(u32, u64)> {
    vec![
        (0, 5_000),
        (1, 0),
        (2, 1),
        (3, 250_000_000),
        (7, 99),
        (8, 123_456),
        (11, 7),
    ]
}

#[test]
fn every_account_with_a_balance_gets_a_proof_that_verifies() {
    for n in [1u32, 2, 3, 5, 8, 9, 100] {
        let b: Vec<(u32, u64)> = (0..n).map(|a| (a, a as u64 * 3 + 1)).collect();
        let t = Tree::build(&SECRET, 1, "BTC", &b).unwrap();
        let total: u64 = b.iter().map(|x| x.1).sum();
        assert_eq!(t.root().sum, total, "n={n}");
        assert!(t.width().is_power_of_two() && t.width() >= n as usize);
        for &(a, bal) in &b {
            let p = t.prove(a, None).unwrap();
            assert_eq!(p.balance, bal);
            assert_eq!(liabilities::verify(&p), Ok(()), "n={n} account={a}");
            let back = InclusionProof::from_json(&p.to_json().to_string()).unwrap();
            assert_eq!(back, p);
        }
    }
}

#[test]
fn zero_balances_get_no_leaf_and_an_empty_snapshot_has_total_zero() {
    let t = Tree::build(&SECRET, 1, "BTC", &snapshot()).unwrap();
    assert!(t.prove(1, None).is_none());
    assert_eq!(t.accounts(), 6);
    let e = Tree::build(&SECRET, 1, "BTC", &[]).unwrap();
    assert_eq!((e.root().sum, e.width()), (0, 1));
}

#[test]
fn nonces_differ_per_proof_so_leaves_do_not_link_across_proofs() {
    let a = Tree::build(&SECRET, 1, "BTC", &snapshot())
        .unwrap()
        .prove(3, None)
        .unwrap();
    let b = Tree::build(&SECRET, 2, "BTC", &snapshot())
        .unwrap()
        .prove(3, None)
        .unwrap();
    assert_ne!(a.nonce, b.nonce);
    assert_ne!(a.root, b.root);
}

#[test]
fn an_account_left_out_of_the_tree_cannot_prove_inclusion() {
    // The operator builds the published tree without account 3 (the largest balance), then
    // hands account 3 a proof made from an honest tree of the same shape: it fails against the
    // published root.
    let all = snapshot();
    let honest = Tree::build(&SECRET, 1, "BTC", &all).unwrap();
    let without: Vec<_> = all.iter().copied().filter(|x| x.0 != 3).collect();
    let published = Tree::build(&SECRET, 1, "BTC", &without).unwrap();
    assert!(published.prove(3, None).is_none());
    let mut p = honest.prove(3, None).unwrap();
    p.root = published.root().hash;
    p.total = published.root().sum;
    assert_eq!(liabilities::verify(&p), Err(VerifyError::RootMismatch));
}

#[test]
fn a_leaf_is_bound_to_its_account_so_two_users_cannot_share_one() {
    // Two accounts with equal balances and (forced) the same nonce still get distinct leaves.
    let n = [7u8; 32];
    assert_ne!(
        liabilities::leaf_hash(&n, Slot::Account(1), "BTC", 500),
        liabilities::leaf_hash(&n, Slot::Account(2), "BTC", 500),
    );
    // The exchange shows account 2 account 1's leaf (equal balances): as issued, the proof names
    // account 1, which account 2 refuses; relabelled for account 2, the path no longer leads to
    // the root. Either way the shared leaf is caught.
    let t = Tree::build(&SECRET, 5, "BTC", &[(1, 500), (2, 500), (3, 9)]).unwrap();
    let a = t.prove(1, None).unwrap();
    assert_eq!(a.account, 1);
    assert_eq!(liabilities::verify_for(&a, 1), Ok(()));
    let err = liabilities::verify_for(&a, 2).unwrap_err();
    assert_eq!(err.code(), "account_mismatch", "{err}");
    let mut relabelled = a.clone();
    relabelled.account = 2;
    assert_eq!(
        liabilities::verify_for(&relabelled, 2),
        Err(VerifyError::RootMismatch)
    );
    let mut v = a.to_json();
    v["account"] = serde_json::json!(2);
    let back = InclusionProof::from_value(v).unwrap();
    assert_eq!(
        liabilities::verify_for(&back, 2),
        Err(VerifyError::RootMismatch)
    );
    // The honest proof of account 2 is its own leaf.
    let b = t.prove(2, None).unwrap();
    assert_eq!(liabilities::verify_for(&b, 2), Ok(()));
    assert_ne!((a.index, a.nonce), (b.index, b.nonce));
}

/// One way to lie in a proof, applied to an honest one.
type Lie = fn(&mut InclusionProof);

#[test]
fn dishonest_proofs_fail_case_table() {
    let cases: &[(&str, Lie, &str)] = &[
        (
            "sum inflated at a node",
            |p| p.path[1].sum += 1_000,
            "root_mismatch",
        ),
        (
            "sum deflated at a node",
            |p| p.path[0].sum = p.path[0].sum.saturating_sub(1),
            "root_mismatch",
        ),
        ("total inflated", |p| p.total += 1, "total_mismatch"),
        ("total deflated", |p| p.total -= 1, "total_mismatch"),
        ("balance changed", |p| p.balance += 1, "root_mismatch"),
        ("wrong nonce", |p| p.nonce[0] ^= 1, "root_mismatch"),
        (
            "another account's label",
            |p| p.account ^= 1,
            "root_mismatch",
        ),
        ("wrong asset", |p| p.asset = "USDT".into(), "root_mismatch"),
        (
            "sibling hash changed",
            |p| p.path[2].hash[31] ^= 0x80,
            "root_mismatch",
        ),
        (
            "wrong side (index flipped)",
            |p| p.index ^= 1,
            "root_mismatch",
        ),
        (
            "index past the tree",
            |p| p.index = 1 << p.path.len(),
            "bad_index",
        ),
        (
            "a path step removed",
            |p| {
                p.path.pop();
                p.index &= (1 << p.path.len()) - 1;
            },
            "root_mismatch",
        ),
        (
            "a path step added",
            |p| {
                p.path.push(Node {
                    hash: [0; 32],
                    sum: 0,
                })
            },
            "root_mismatch",
        ),
        ("sums overflow", |p| p.path[0].sum = u64::MAX, "overflow"),
        ("unknown version", |p| p.version = 1, "version"),
        ("asset with NUL", |p| p.asset = "BT\0C".into(), "bad_asset"),
    ];
    let t = Tree::build(&SECRET, 9, "BTC", &snapshot()).unwrap();
    let honest = t.prove(8, None).unwrap();
    assert_eq!(liabilities::verify(&honest), Ok(()));
    for (name, lie, code) in cases {
        let mut p = honest.clone();
        lie(&mut p);
        let err = liabilities::verify(&p).expect_err(name);
        assert_eq!(err.code(), *code, "{name}: {err}");
    }
}

#[test]
fn a_sum_inflated_at_a_node_and_rehashed_up_still_fails_against_the_published_root() {
    // The operator recomputes every hash above a node whose sum it changed: the root hash moves,
    // so a user holding the published root sees it.
    let t = Tree::build(&SECRET, 3, "BTC", &snapshot()).unwrap();
    let mut p = t.prove(0, None).unwrap();
    p.path[0].sum += 10;
    let mut h = liabilities::leaf_hash(&p.nonce, Slot::Account(p.account), &p.asset, p.balance);
    let mut s = p.balance;
    for (k, sib) in p.path.iter().enumerate() {
        h = if (p.index >> k) & 1 == 1 {
            liabilities::node_hash(&sib.hash, sib.sum, &h, s)
        } else {
            liabilities::node_hash(&h, s, &sib.hash, sib.sum)
        };
        s += sib.sum;
    }
    let forged = p.clone();
    p.root = h;
    p.total = s;
    assert_eq!(liabilities::verify(&p), Ok(()), "self-consistent forgery");
    assert_ne!(
        p.root,
        t.root().hash,
        "but its root is not the published one"
    );
    assert_eq!(liabilities::verify(&forged), Err(VerifyError::RootMismatch));
}

#[test]
fn bad_files_give_a_clear_error_case_table() {
    let t = Tree::build(&SECRET, 9, "BTC", &snapshot()).unwrap();
    let good = t.prove(8, Some([1; 32])).unwrap().to_json().to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty file", String::new(), "malformed"),
        ("truncated", good[..good.len() / 2].to_owned(), "malformed"),
        ("not json", "hello".into(), "malformed"),
        ("array", "[]".into(), "malformed"),
        (
            "missing root",
            good.replace("\"root\"", "\"rooot\""),
            "malformed",
        ),
        (
            "balance as number",
            good.replacen("\"balance\":\"123456\"", "\"balance\":123456", 1),
            "malformed",
        ),
        (
            "negative balance",
            good.replacen("\"balance\":\"123456\"", "\"balance\":\"-1\"", 1),
            "bad_amount",
        ),
        (
            "balance above u64",
            good.replacen(
                "\"balance\":\"123456\"",
                "\"balance\":\"18446744073709551616\"",
                1,
            ),
            "bad_amount",
        ),
        (
            "short nonce",
            good.replacen("\"nonce\":\"", "\"nonce\":\"ab", 1),
            "bad_hex",
        ),
        (
            "no account (a version 1 proof)",
            {
                let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
                v.as_object_mut().unwrap().remove("account");
                v.to_string()
            },
            "malformed",
        ),
        (
            "negative account",
            good.replacen("\"account\":8", "\"account\":-8", 1),
            "malformed",
        ),
        (
            "version 7",
            good.replacen("\"version\":2", "\"version\":7", 1),
            "version",
        ),
        (
            "deep path",
            {
                let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
                let step = v["path"][0].clone();
                v["path"] = serde_json::Value::Array(vec![step; 41]);
                v.to_string()
            },
            "bad_index",
        ),
    ];
    assert!(good.contains("\"balance\":\"123456\""), "{good}");
    assert!(good.contains("\"account\":8"), "{good}");
    for (name, text, code) in cases {
        let err = InclusionProof::from_json(&text).expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn build_refuses_overflow_duplicates_and_bad_assets() {
    use liabilities::BuildError as B;
    assert!(matches!(
        Tree::build(&SECRET, 1, "BTC", &[(1, u64::MAX), (2, 1)]),
        Err(B::Overflow { .. })
    ));
    assert!(matches!(
        Tree::build(&SECRET, 1, "BTC", &[(1, 5), (1, 6)]),
        Err(B::DuplicateAccount { .. })
    ));
    assert!(matches!(
        Tree::build(&SECRET, 1, "", &[]),
        Err(B::BadAsset { .. })
    ));
    assert!(matches!(
        Tree::build(&SECRET, 1, "B\0", &[]),
        Err(B::BadAsset { .. })
    ));
}

#[test]
fn the_commitment_binds_roots_and_the_audit_head() {
    let t = Tree::build(&SECRET, 1, "BTC", &snapshot()).unwrap();
    let roots = vec![
        ("BTC".to_string(), t.root()),
        (
            "USDT".to_string(),
            Node {
                hash: [3; 32],
                sum: 9,
            },
        ),
    ];
    let c = liabilities::commitment(1, Some([5; 32]), &roots);
    let reversed: Vec<_> = roots.iter().rev().cloned().collect();
    assert_eq!(
        c,
        liabilities::commitment(1, Some([5; 32]), &reversed),
        "order-independent"
    );
    assert_ne!(
        c,
        liabilities::commitment(1, Some([6; 32]), &roots),
        "audit head bound"
    );
    assert_ne!(
        c,
        liabilities::commitment(2, Some([5; 32]), &roots),
        "proof id bound"
    );
    let mut inflated = roots.clone();
    inflated[1].1.sum += 1;
    assert_ne!(
        c,
        liabilities::commitment(1, Some([5; 32]), &inflated),
        "totals bound"
    );
}

#[test]
fn known_answer_vectors_pin_the_format() {
    // Computed independently (Python hashlib) from the byte layout in docs/liabilities-proof.md:
    // a change here is a format change (bump the version).
    // Version 2: the leaf of account 1, nonce all zeros, 1 base unit of BTC.
    let leaf = liabilities::leaf_hash(&[0u8; 32], Slot::Account(1), "BTC", 1);
    assert_eq!(
        hex::encode(leaf),
        "9abf2f457405b7c9ec0aea023b0b78619d061eda316e884ecbbc57750fedcae8"
    );
    let node = liabilities::node_hash(&leaf, 1, &[0x11; 32], 2);
    assert_eq!(
        hex::encode(node),
        "6b9b61c65283cbbfb7c9270ec65eb76f592add9031b66cfed8bdacf29f403092"
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a naive model: the root total is the plain sum, every account with a balance
        /// proves inclusion, and changing any one amount in a proof makes it fail.
        #[test]
        fn every_proof_verifies_and_any_changed_amount_fails(
            balances in proptest::collection::btree_map(any::<u32>(), 0u64..1_000_000_000_000, 0..40),
            pick in any::<proptest::sample::Index>(),
            delta in 1u64..1_000,
        ) {
            let b: Vec<(u32, u64)> = balances.into_iter().collect();
            let t = Tree::build(&SECRET, 77, "BTC", &b).unwrap();
            prop_assert_eq!(t.root().sum, b.iter().map(|x| x.1).sum::<u64>());
            let with_leaf: Vec<_> = b.iter().filter(|x| x.1 > 0).collect();
            prop_assert_eq!(t.accounts(), with_leaf.len());
            for &&(a, bal) in &with_leaf {
                let p = t.prove(a, None).unwrap();
                prop_assert_eq!(p.balance, bal);
                prop_assert_eq!(liabilities::verify(&p), Ok(()));
            }
            if let Some(&&(a, _)) = with_leaf.get(pick.index(with_leaf.len().max(1))) {
                let p = t.prove(a, None).unwrap();
                let n = p.path.len() + 3;
                let i = pick.index(n);
                let mut q = p.clone();
                match i {
                    0 => q.balance += delta,
                    1 => q.total += delta,
                    2 => q.account = q.account.wrapping_add(delta as u32),
                    k => q.path[k - 3].sum += delta,
                }
                prop_assert!(liabilities::verify(&q).is_err(), "changed amount {} verified", i);
            }
        }
    }
}
