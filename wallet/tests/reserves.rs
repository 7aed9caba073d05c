//! The BIP-127 proof of reserves the wallet signs, on regtest: it covers every confirmed UTXO at
//! the tip, follows the BIP (single SHA-256 commitment, field 0x09, SIGHASH_ALL, one output of
//! the inputs' sum), verifies offline, and each tampered variant fails with its code.

mod support;

use reserves::por::{self, commitment_txid, PSBT_IN_POR_COMMITMENT};
use support::{Customer, World};
use wallet::bitcoin::hashes::{sha256, Hash};
use wallet::bitcoin::{Amount, ScriptBuf, TxOut};

#[test]
fn proof_of_reserves_covers_the_confirmed_utxos_and_tampering_fails() {
    let w = World::new();
    let alice = w.ledger.create_account();
    let mut svc = w.open(w.config());
    let mut customer = Customer::new(7);
    customer.fund(&w.node, 1);
    for amount in [1_000_000u64, 250_000, 3_333] {
        let addr = svc.new_deposit_address(alice, w.clock.now()).unwrap();
        customer.pay(&w.node, &[(&addr, amount)]);
    }
    // One more deposit stays in the mempool: not proven (not in a block).
    let addr = svc.new_deposit_address(alice, w.clock.now()).unwrap();
    w.node.mine(1);
    customer.sync(&w.node);
    customer.pay(&w.node, &[(&addr, 77_777)]);
    svc.step(w.clock.now()).unwrap();

    let message = "Mediator test proof: block bound elsewhere";
    let proof = svc.prove_reserves(message).unwrap();
    assert_eq!(proof.utxos, 3);
    assert_eq!(proof.reserves.0, 1_253_333);
    assert_eq!(proof.block_height as u64, w.node.height());
    let psbt = &proof.psbt;
    let tx = &psbt.unsigned_tx;
    // BIP-127: the commitment is the *single* SHA-256 of the prefixed message.
    let single = sha256::Hash::hash(format!("Proof-of-Reserves: {message}").as_bytes());
    assert_eq!(
        tx.input[0].previous_output.txid.to_byte_array(),
        single.to_byte_array()
    );
    assert_eq!(tx.input[0].previous_output.vout, 0);
    assert_eq!(tx.input[0].previous_output.txid, commitment_txid(message));
    let field = psbt.inputs[0]
        .unknown
        .iter()
        .find(|(k, _)| k.type_value == PSBT_IN_POR_COMMITMENT && k.key.is_empty())
        .map(|(_, v)| v.clone());
    assert_eq!(field.as_deref(), Some(message.as_bytes()));
    assert_eq!(tx.output.len(), 1);
    assert_eq!(tx.output[0].value.to_sat(), 1_253_333);
    let checked = por::verify_psbt(psbt, message).unwrap();
    assert_eq!(checked.inputs.len(), 3);
    // Every reserve input is signed SIGHASH_ALL (last byte of the DER signature).
    for i in &psbt.inputs[1..] {
        let w = i.final_script_witness.as_ref().unwrap();
        assert_eq!(*w[0].last().unwrap(), 0x01);
    }

    // Tampered variants.
    let code = |p: &wallet::bitcoin::Psbt, m: &str| por::verify_psbt(p, m).unwrap_err().code();
    assert_eq!(code(psbt, "another message"), "commitment_mismatch");
    let mut two_outputs = psbt.clone();
    two_outputs.unsigned_tx.output.push(TxOut {
        value: Amount::from_sat(1),
        script_pubkey: ScriptBuf::new_op_return([]),
    });
    two_outputs.outputs.push(Default::default());
    assert_eq!(code(&two_outputs, message), "bad_outputs");
    two_outputs.unsigned_tx.output.remove(0);
    two_outputs.outputs.remove(0);
    assert_eq!(
        code(&two_outputs, message),
        "bad_signature",
        "SIGHASH_ALL covers the output"
    );
    let mut inflated = psbt.clone();
    inflated.inputs[1].witness_utxo.as_mut().unwrap().value += Amount::from_sat(1);
    assert_eq!(
        code(&inflated, message),
        "bad_signature",
        "BIP143 signs the amount"
    );
    let mut unsigned = psbt.clone();
    unsigned.inputs[2].final_script_witness = None;
    assert_eq!(code(&unsigned, message), "bad_signature");
    let mut no_field = psbt.clone();
    no_field.inputs[0].unknown.clear();
    assert_eq!(code(&no_field, message), "commitment_mismatch");
    // Another message re-committed in input 0 but with the old signatures.
    let mut recommitted = psbt.clone();
    recommitted.unsigned_tx.input[0].previous_output.txid = commitment_txid("other");
    recommitted.inputs[0]
        .unknown
        .values_mut()
        .for_each(|v| *v = b"other".to_vec());
    assert_eq!(code(&recommitted, "other"), "bad_signature");

    // Nothing confirmed, nothing to prove.
    let empty = w.open(wallet::CustodyConfig {
        data_dir: w.dir.path().join("empty"),
        ..w.config()
    });
    assert!(matches!(
        empty.prove_reserves(message),
        Err(wallet::ProveError::NoUtxos)
    ));
}

/// Review finding: a deposit confirmed but not yet credited (fewer confirmations than custody
/// requires) was proven as reserves while no balance counted it as a liability: the last blocks
/// of incoming deposits inflated the proven surplus (the reconciliation already left them out).
/// Left out of the proof until credited.
#[test]
fn a_deposit_not_yet_credited_is_not_proven() {
    let w = World::new();
    let alice = w.ledger.create_account();
    let mut svc = w.open(wallet::CustodyConfig {
        deposit_confirmations: 2,
        ..w.config()
    });
    let mut customer = Customer::new(8);
    customer.fund(&w.node, 1);
    let addr = svc.new_deposit_address(alice, w.clock.now()).unwrap();
    customer.pay(&w.node, &[(&addr, 1_000_000)]);
    w.node.mine(1);
    svc.step(w.clock.now()).unwrap();
    assert_eq!(w.ledger.btc(alice), (0, 0), "one confirmation of two");
    assert!(matches!(
        svc.prove_reserves("m"),
        Err(wallet::ProveError::NoUtxos)
    ));
    w.node.mine(1);
    svc.step(w.clock.now()).unwrap();
    assert_eq!(w.ledger.btc(alice), (1_000_000, 0));
    let proof = svc.prove_reserves("m").unwrap();
    assert_eq!((proof.utxos, proof.reserves.0), (1, 1_000_000));
}
