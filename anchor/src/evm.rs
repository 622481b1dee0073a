//! EVM chains (Ethereum, IOTA EVM, any chain with the Ethereum JSON-RPC):
//! a checkpoint is anchored by a plain transaction from the anchoring
//! account whose calldata is `MNA1 || SHA-256(checkpoint note)`
//! (`notary_proof::receipt::evm_calldata`). No contract is needed, so it
//! works on any EVM chain, and anyone can check it with an RPC endpoint
//! alone: [`check_on_chain`].
//!
//! This file holds the chain operations: signing an anchoring transaction
//! locally (so its hash is known, and can be persisted, before it is sent),
//! broadcasting it, following it to finality, and checking a receipt
//! against a chain. Scheduling (the newest checkpoint at most once per
//! interval) and persistence are the caller's.

use alloy::network::eip2718::Encodable2718 as _;
use alloy::network::{EthereumWallet, NetworkTransactionBuilder as _, TransactionBuilder as _};
use alloy::primitives::{Address, Bytes, B256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use notary_proof::hash::sha256;
use notary_proof::receipt::evm_calldata;
use notary_proof::{EvmStatus, Hash, Receipt};
use std::time::Duration;

/// How to reach the chain and anchor on it.
#[derive(Clone)]
pub struct EvmSettings {
    /// JSON-RPC endpoint (http or https).
    pub rpc_url: String,
    /// The anchoring account's private key: 32 bytes.
    pub private_key: [u8; 32],
    /// The recipient of anchoring transactions; `None`: the account itself.
    pub to: Option<[u8; 20]>,
    /// The chain the operator means; a different chain is refused.
    pub chain_id: Option<u64>,
    /// Blocks on top of the anchoring block (itself included) before the
    /// anchor is final.
    pub confirmations: u64,
    /// Limit for one RPC round trip.
    pub timeout: Duration,
}

impl std::fmt::Debug for EvmSettings {
    // The private key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvmSettings")
            .field("rpc_url", &redact(&self.rpc_url, &self.rpc_url))
            .field("to", &self.to.map(hex::encode))
            .field("chain_id", &self.chain_id)
            .field("confirmations", &self.confirmations)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvmError {
    /// Worth retrying: the endpoint is down, slow, or answered oddly.
    #[error("RPC: {0}")]
    Rpc(String),
    /// Needs an operator: wrong chain, unfunded account, bad settings.
    #[error("{0}")]
    Config(String),
    /// The node refused the transaction because its nonce is used already
    /// (by another transaction of the account, or by this one, mined).
    #[error("nonce already used: {0}")]
    NonceUsed(String),
    /// The node refused the transaction for another reason (fee too low,
    /// gas limit, ...). Sign a new one rather than sending this one again.
    #[error("refused by the node: {0}")]
    Refused(String),
}

/// An anchoring transaction, signed and not necessarily sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAnchor {
    pub tx_hash: Hash,
    /// The EIP-2718 encoding, as `eth_sendRawTransaction` takes it.
    pub raw: Vec<u8>,
    pub nonce: u64,
}

/// An RPC URL often carries an API key (in its path, query or user info);
/// errors that quote it are logged with only its scheme, host and port.
pub fn redact(message: &str, rpc_url: &str) -> String {
    let Some((scheme, rest)) = rpc_url.split_once("://") else {
        return message.replace(rpc_url, "<rpc url>");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    let shown = format!("{scheme}://{host}/...");
    // reqwest may print the URL normalized with a trailing slash.
    message.replace(rpc_url, &shown).replace(&format!("{rpc_url}/"), &shown)
}

/// Where an anchoring transaction stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxState {
    /// Not (or no longer) known to the node: never sent, dropped, replaced,
    /// or reorganized out. Send again.
    Unknown,
    /// Sent, not yet mined.
    Unmined,
    /// Mined and successful, with this many confirmations so far.
    Mined { confirmations: u64, gas_used: u64, receipt: Receipt },
    /// Mined but reverted (cannot happen for a plain transfer, but chains differ).
    Reverted,
}

/// A connection to one EVM chain with the anchoring key.
pub struct EvmClient {
    rt: tokio::runtime::Runtime,
    provider: alloy::providers::DynProvider,
    wallet: EthereumWallet,
    from: Address,
    to: Address,
    chain_id: u64,
    confirmations: u64,
    timeout: Duration,
}

fn rpc(e: impl std::fmt::Display) -> EvmError {
    EvmError::Rpc(e.to_string())
}

impl EvmClient {
    /// Connects, and checks the chain id against the settings.
    pub fn connect(s: &EvmSettings) -> Result<Self, EvmError> {
        let signer = PrivateKeySigner::from_bytes(&B256::from(s.private_key))
            .map_err(|_| EvmError::Config("the EVM private key is not a valid secp256k1 key".into()))?;
        let from = signer.address();
        let url =
            s.rpc_url.parse().map_err(|_| EvmError::Config(format!("invalid RPC URL {:?}", s.rpc_url)))?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(rpc)?;
        let provider = ProviderBuilder::new().disable_recommended_fillers().connect_http(url).erased();
        let mut client = EvmClient {
            rt,
            provider,
            wallet: EthereumWallet::from(signer),
            from,
            to: s.to.map_or(from, Address::from),
            chain_id: 0,
            confirmations: s.confirmations.max(1),
            timeout: s.timeout,
        };
        let chain_id = client.call(|p| async move { p.get_chain_id().await })?;
        if let Some(want) = s.chain_id.filter(|w| *w != chain_id) {
            return Err(EvmError::Config(format!(
                "the RPC endpoint serves chain {chain_id}, configured is {want}"
            )));
        }
        client.chain_id = chain_id;
        Ok(client)
    }

    pub fn from(&self) -> [u8; 20] {
        self.from.into()
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    fn call<T, F, Fut>(&self, f: F) -> Result<T, EvmError>
    where
        F: FnOnce(alloy::providers::DynProvider) -> Fut,
        Fut: std::future::Future<Output = Result<T, alloy::transports::TransportError>>,
    {
        let fut = f(self.provider.clone());
        self.rt
            .block_on(async { tokio::time::timeout(self.timeout, fut).await })
            .map_err(|_| EvmError::Rpc("timed out".into()))?
            .map_err(classify)
    }

    /// The account's next nonce: counting only mined transactions
    /// (`pending = false`), or also those in the node's pool.
    pub fn nonce(&self, pending: bool) -> Result<u64, EvmError> {
        let from = self.from;
        if pending {
            self.call(|p| async move { p.get_transaction_count(from).pending().await })
        } else {
            self.call(|p| async move { p.get_transaction_count(from).latest().await })
        }
    }

    /// Signs, without sending, the transaction that anchors a checkpoint
    /// note at `nonce`. Gas and fees come from the node (EIP-1559 where the
    /// chain has a base fee, else a legacy gas price).
    pub fn sign(&self, checkpoint_note: &str, nonce: u64) -> Result<SignedAnchor, EvmError> {
        let data = evm_calldata(&sha256(checkpoint_note.as_bytes()));
        let mut tx = TransactionRequest::default()
            .with_from(self.from)
            .with_to(self.to)
            .with_chain_id(self.chain_id)
            .with_nonce(nonce)
            .with_input(Bytes::copy_from_slice(&data));
        let probe = tx.clone();
        let gas = self.call(|p| async move { p.estimate_gas(probe).await })?;
        tx.set_gas_limit(gas);
        match self.call(|p| async move { p.estimate_eip1559_fees().await }) {
            Ok(fees) => {
                tx.set_max_fee_per_gas(fees.max_fee_per_gas);
                tx.set_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
            }
            Err(EvmError::Rpc(_)) => {
                let price = self.call(|p| async move { p.get_gas_price().await })?;
                tx.set_gas_price(price);
            }
            Err(e) => return Err(e),
        }
        let envelope = self
            .rt
            .block_on(tx.build(&self.wallet))
            .map_err(|e| EvmError::Config(format!("cannot sign the anchoring transaction: {e}")))?;
        Ok(SignedAnchor { tx_hash: (*envelope.tx_hash()).into(), raw: envelope.encoded_2718(), nonce })
    }

    /// Sends a signed transaction. Sending one the node already holds is
    /// not an error, so a broadcast may be repeated safely.
    pub fn broadcast(&self, raw: &[u8]) -> Result<(), EvmError> {
        let raw = raw.to_vec();
        let result = self
            .rt
            .block_on(async {
                tokio::time::timeout(self.timeout, self.provider.send_raw_transaction(&raw)).await
            })
            .map_err(|_| EvmError::Rpc("timed out".into()))?;
        let Err(e) = result else { return Ok(()) };
        let Some(resp) = e.as_error_resp() else { return Err(classify(e)) };
        let message = resp.message.to_string();
        let lower = message.to_ascii_lowercase();
        if lower.contains("already known")
            || lower.contains("known transaction")
            || lower.contains("already imported")
        {
            Ok(())
        } else if lower.contains("nonce too low") || lower.contains("nonce has already been used") {
            Err(EvmError::NonceUsed(message))
        } else if lower.contains("insufficient funds") || lower.contains("chain id") {
            Err(EvmError::Config(message))
        } else {
            Err(EvmError::Refused(message))
        }
    }

    /// Signs and sends the anchoring transaction for a checkpoint note at the
    /// account's next nonce; returns its hash.
    pub fn submit(&self, checkpoint_note: &str) -> Result<Hash, EvmError> {
        let signed = self.sign(checkpoint_note, self.nonce(true)?)?;
        self.broadcast(&signed.raw)?;
        Ok(signed.tx_hash)
    }

    /// Follows an anchoring transaction: mined, how deep, canonical.
    pub fn state(&self, tx_hash: &Hash, checkpoint_note: &str) -> Result<TxState, EvmError> {
        let hash = B256::from(*tx_hash);
        let Some(receipt) = self.call(|p| async move { p.get_transaction_receipt(hash).await })? else {
            let tx = self.call(|p| async move { p.get_transaction_by_hash(hash).await })?;
            return Ok(if tx.is_some() { TxState::Unmined } else { TxState::Unknown });
        };
        if !receipt.status() {
            return Ok(TxState::Reverted);
        }
        let (Some(number), Some(block_hash)) = (receipt.block_number, receipt.block_hash) else {
            return Ok(TxState::Unmined);
        };
        // The receipt's block must still be the canonical block at its height.
        let canonical = self.call(|p| async move { p.get_block_by_number(number.into()).await })?;
        if canonical.map(|b| b.header.hash) != Some(block_hash) {
            return Ok(TxState::Unknown);
        }
        let head = self.call(|p| async move { p.get_block_number().await })?;
        let confirmations = head.saturating_sub(number) + 1;
        let status = if confirmations >= self.confirmations { EvmStatus::Final } else { EvmStatus::Pending };
        Ok(TxState::Mined {
            confirmations,
            gas_used: receipt.gas_used,
            receipt: Receipt::Evm {
                status,
                chain_id: self.chain_id,
                tx_hash: *tx_hash,
                block_number: number,
                block_hash: block_hash.into(),
                from: self.from.into(),
                to: self.to.into(),
                checkpoint_hash: sha256(checkpoint_note.as_bytes()),
            },
        })
    }

    /// Confirmations an anchor needs to be final.
    pub fn confirmations(&self) -> u64 {
        self.confirmations
    }

    /// The provider, for callers that need more (tests mine blocks with it).
    pub fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    pub fn provider(&self) -> &alloy::providers::DynProvider {
        &self.provider
    }
}

/// Sorts RPC failures: those an operator must fix, and the rest (retry).
fn classify(e: alloy::transports::TransportError) -> EvmError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("insufficient funds") || lower.contains("invalid chain id") {
        EvmError::Config(text)
    } else {
        EvmError::Rpc(text)
    }
}

/// Why an EVM receipt does not hold on a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OnChainError {
    #[error("cannot check: {0}")]
    Unreachable(String),
    #[error("the RPC endpoint serves chain {actual}, the receipt names chain {expected}")]
    WrongChain { expected: u64, actual: u64 },
    #[error("the transaction is not in the chain")]
    NotFound,
    #[error("the transaction is not in the canonical chain at the receipt's block")]
    NotCanonical,
    #[error("the transaction failed on chain")]
    Reverted,
    #[error("the transaction was sent from {actual}, not from {expected}")]
    WrongSender { expected: String, actual: String },
    #[error("the transaction's recipient or calldata does not commit to this checkpoint")]
    WrongCommitment,
    #[error("{actual} confirmations, {required} required")]
    TooFewConfirmations { actual: u64, required: u64 },
    #[error("not an EVM receipt")]
    NotEvm,
}

/// Checks an EVM receipt against a chain, trusting nothing but the RPC
/// endpoint: the transaction exists in the canonical chain at the receipt's
/// block with at least `min_confirmations`, was sent by `expected_from`
/// (when given; else by the receipt's `from`), goes to the receipt's `to`,
/// and carries exactly the calldata for the receipt's checkpoint hash.
/// Returns the confirmations.
pub fn check_on_chain(
    rpc_url: &str,
    receipt: &Receipt,
    expected_from: Option<[u8; 20]>,
    min_confirmations: u64,
    timeout: Duration,
) -> Result<u64, OnChainError> {
    let Receipt::Evm { chain_id, tx_hash, block_number, block_hash, from, to, checkpoint_hash, .. } = receipt
    else {
        return Err(OnChainError::NotEvm);
    };
    let unreachable = |e: &dyn std::fmt::Display| OnChainError::Unreachable(e.to_string());
    let url =
        rpc_url.parse().map_err(|_| OnChainError::Unreachable(format!("invalid RPC URL {rpc_url:?}")))?;
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| unreachable(&e))?;
    let provider = ProviderBuilder::new().disable_recommended_fillers().connect_http(url);
    rt.block_on(async {
        let call = |fut| async { tokio::time::timeout(timeout, fut).await };
        let actual =
            call(provider.get_chain_id()).await.map_err(|e| unreachable(&e))?.map_err(|e| unreachable(&e))?;
        if actual != *chain_id {
            return Err(OnChainError::WrongChain { expected: *chain_id, actual });
        }
        let hash = B256::from(*tx_hash);
        let tx = tokio::time::timeout(timeout, provider.get_transaction_by_hash(hash))
            .await
            .map_err(|e| unreachable(&e))?
            .map_err(|e| unreachable(&e))?
            .ok_or(OnChainError::NotFound)?;
        let rcpt = tokio::time::timeout(timeout, provider.get_transaction_receipt(hash))
            .await
            .map_err(|e| unreachable(&e))?
            .map_err(|e| unreachable(&e))?
            .ok_or(OnChainError::NotFound)?;
        if rcpt.block_number != Some(*block_number) || rcpt.block_hash != Some(B256::from(*block_hash)) {
            return Err(OnChainError::NotCanonical);
        }
        let canonical = tokio::time::timeout(timeout, provider.get_block_by_number((*block_number).into()))
            .await
            .map_err(|e| unreachable(&e))?
            .map_err(|e| unreachable(&e))?;
        if canonical.map(|b| b.header.hash) != Some(B256::from(*block_hash)) {
            return Err(OnChainError::NotCanonical);
        }
        if !rcpt.status() {
            return Err(OnChainError::Reverted);
        }
        let sender: [u8; 20] = rcpt.from.into();
        let want = expected_from.unwrap_or(*from);
        if sender != want || sender != *from {
            return Err(OnChainError::WrongSender {
                expected: format!("0x{}", hex::encode(want)),
                actual: format!("0x{}", hex::encode(sender)),
            });
        }
        use alloy::consensus::Transaction as _;
        let input = tx.input();
        let recipient = tx.to().map(<[u8; 20]>::from);
        if recipient != Some(*to) || input.as_ref() != evm_calldata(checkpoint_hash).as_slice() {
            return Err(OnChainError::WrongCommitment);
        }
        let head = tokio::time::timeout(timeout, provider.get_block_number())
            .await
            .map_err(|e| unreachable(&e))?
            .map_err(|e| unreachable(&e))?;
        let confirmations = head.saturating_sub(*block_number) + 1;
        if confirmations < min_confirmations {
            return Err(OnChainError::TooFewConfirmations {
                actual: confirmations,
                required: min_confirmations,
            });
        }
        Ok(confirmations)
    })
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn rpc_urls_are_redacted_in_logs() {
        let url = "https://user:pw@mainnet.example.io/v3/SECRETKEY?x=1";
        let m = redact(&format!("error sending request for url ({url})"), url);
        assert!(!m.contains("SECRETKEY") && !m.contains("pw@"), "{m}");
        assert!(m.contains("https://mainnet.example.io/..."), "{m}");
    }
}
