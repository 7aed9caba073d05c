//! The BIP-127 parts that need no wallet: the commitment pinned by a known answer (single
//! SHA-256, not double as bdk-reserves does), the unsigned proof's shape, and refusals of bad
//! input with their stable codes.

use bitcoin::hashes::Hash;
use bitcoin::psbt;
use bitcoin::{Amount, OutPoint, ScriptBuf, TxOut, Txid};
use reserves::por::{self, commitment_txid, ProofDocument, PSBT_IN_POR_COMMITMENT};

#[test]
fn the_commitment_is_the_single_sha256_of_the_prefixed_message() {
    // sha256("Proof-of-Reserves: Some Message"), computed independently (Python hashlib).
    let t = commitment_txid("Some Message");
    assert_eq!(
        hex::encode(t.to_byte_array()),
        "30896246cd560f641d84e2ddcd9ee0f8fd74e4547be75aa7d6464f75dd372dff"
    );
    // Displayed reversed, like every txid.
    assert_eq!(
        t.to_string(),
        "ff2d37dd754f46d6a75ae77b54e474fdf8e09ecddde2841d640f56cd46628930"
    );
    // Not the double SHA-256 (bdk-reserves).
    assert_ne!(
        t.to_string(),
        "a7d117d1678e4d9768df8ebe9501cfb8181ee3c8ed13c931e23c69744efcc9ba"
    );
}

fn input(value: u64) -> psbt::Input {
    psbt::Input {
        witness_utxo: Some(TxOut {
            value: Amount::from_sat(value),
            script_pubkey: ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::all_zeros()),
        }),
        ..Default::default()
    }
}

fn op(n: u8, vout: u32) -> OutPoint {
    OutPoint {
        txid: Txid::from_byte_array([n; 32]),
        vout,
    }
}

#[test]
fn the_unsigned_proof_has_the_bip127_shape() {
    let p = por::proof_psbt("m", vec![(op(1, 0), input(5)), (op(2, 3), input(7))]).unwrap();
    let tx = &p.unsigned_tx;
    assert_eq!(tx.input.len(), 3);
    assert_eq!(
        tx.input[0].previous_output,
        OutPoint {
            txid: commitment_txid("m"),
            vout: 0
        }
    );
    assert!(tx.input[0].script_sig.is_empty());
    assert!(tx
        .input
        .iter()
        .all(|i| i.sequence == bitcoin::Sequence::MAX));
    assert_eq!(tx.output.len(), 1);
    assert_eq!(tx.output[0].value, Amount::from_sat(12));
    assert!(tx.output[0].script_pubkey.is_op_return());
    let field: Vec<_> = p.inputs[0]
        .unknown
        .iter()
        .map(|(k, v)| (k.type_value, k.key.clone(), v.clone()))
        .collect();
    assert_eq!(field, vec![(PSBT_IN_POR_COMMITMENT, vec![], b"m".to_vec())]);
    // Round trip through the wire format keeps field 0x09.
    let back = bitcoin::Psbt::deserialize(&p.serialize()).unwrap();
    assert_eq!(back, p);
    // Unsigned: refused as such.
    assert_eq!(
        por::verify_psbt(&p, "m").unwrap_err().code(),
        "bad_signature"
    );
}

#[test]
fn bad_input_is_refused_with_its_code() {
    let cases: Vec<(&str, Result<bitcoin::Psbt, por::PorError>, &str)> = vec![
        (
            "empty message",
            por::proof_psbt("", vec![(op(1, 0), input(1))]),
            "bad_message",
        ),
        ("no utxo", por::proof_psbt("m", vec![]), "no_utxos"),
        (
            "duplicate outpoint",
            por::proof_psbt("m", vec![(op(1, 0), input(1)), (op(1, 0), input(1))]),
            "duplicate_input",
        ),
        (
            "no witness utxo",
            por::proof_psbt("m", vec![(op(1, 0), psbt::Input::default())]),
            "missing_utxo",
        ),
        (
            "overflow",
            por::proof_psbt(
                "m",
                vec![(op(1, 0), input(u64::MAX)), (op(2, 0), input(u64::MAX))],
            ),
            "overflow",
        ),
    ];
    for (name, r, code) in cases {
        assert_eq!(r.unwrap_err().code(), code, "{name}");
    }
    let doc_cases = [
        ("not json", "{", "malformed"),
        ("empty", "", "malformed"),
        ("version 2", r#"{"version":2}"#, "version"),
        ("missing fields", r#"{"version":1}"#, "malformed"),
    ];
    for (name, text, code) in doc_cases {
        assert_eq!(
            ProofDocument::from_json(text).unwrap_err().code(),
            code,
            "{name}"
        );
    }
}
