//! Session tickets sealed with keys the supervisor owns.
//!
//! The supervisor makes the master keys, rotates them and sends them to
//! every worker, so a ticket issued by one worker resumes on any other.
//! Each endpoint seals with its own key, derived from the master key and
//! a context naming the endpoint, its scope and the client trust it was
//! issued under: a ticket cannot cross endpoints, and a change of client
//! CA makes every older ticket of that scope useless.
//!
//! Ticket layout: master key id (16) ‖ nonce (12) ‖ AES-256-GCM sealed
//! session state, the key id as associated data.

use std::fmt;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

use crate::frame::FrameError;

/// Length of a master key's public identifier.
pub const KEY_ID_LEN: usize = 16;
/// Length of a master key's secret.
pub const SECRET_LEN: usize = 32;
const TAG_LEN: usize = 16;
const SALT: &[u8] = b"spicegw session ticket key v1";

/// One master key as the supervisor sends it.
pub struct MasterKey {
    pub id: [u8; KEY_ID_LEN],
    secret: [u8; SECRET_LEN],
}

impl fmt::Debug for MasterKey {
    // Never print the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The master keys in force: the first seals, all of them open.
#[derive(Debug, Default)]
pub struct TicketKeys {
    pub generation: u64,
    pub lifetime: u32,
    pub keys: Vec<MasterKey>,
}

impl TicketKeys {
    /// Parses a TicketKeys frame payload: lifetime in seconds (u32 BE),
    /// then (id, secret) pairs, newest first.
    pub fn decode(generation: u64, payload: &[u8]) -> Result<Self, FrameError> {
        let (lifetime, entries) = payload
            .split_first_chunk::<4>()
            .ok_or(FrameError::BadField("ticket key lifetime"))?;
        if entries.len() % (KEY_ID_LEN + SECRET_LEN) != 0 {
            return Err(FrameError::BadField("ticket key entries"));
        }
        let keys = entries
            .chunks_exact(KEY_ID_LEN + SECRET_LEN)
            .map(|entry| {
                let mut id = [0u8; KEY_ID_LEN];
                let mut secret = [0u8; SECRET_LEN];
                id.copy_from_slice(&entry[..KEY_ID_LEN]);
                secret.copy_from_slice(&entry[KEY_ID_LEN..]);
                MasterKey { id, secret }
            })
            .collect();
        Ok(Self {
            generation,
            lifetime: u32::from_be_bytes(*lifetime),
            keys,
        })
    }
}

/// The worker-wide slot the control loop swaps new keys into.
pub type SharedKeys = Arc<ArcSwap<TicketKeys>>;

/// Seals and opens tickets for one endpoint under one client trust.
pub struct Ticketer {
    keys: SharedKeys,
    context: Vec<u8>,
    derived: ArcSwapOption<Derived>,
    random: SystemRandom,
}

struct Derived {
    generation: u64,
    keys: Vec<([u8; KEY_ID_LEN], LessSafeKey)>,
}

impl fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticketer").finish_non_exhaustive()
    }
}

impl Ticketer {
    pub fn new(keys: SharedKeys, context: Vec<u8>) -> Self {
        Self {
            keys,
            context,
            derived: ArcSwapOption::empty(),
            random: SystemRandom::new(),
        }
    }

    /// This endpoint's keys for the current master keys, derived once per
    /// master generation.
    fn derived(&self) -> Option<Arc<Derived>> {
        let masters = self.keys.load();
        if let Some(derived) = self.derived.load_full() {
            if derived.generation == masters.generation {
                return Some(derived);
            }
        }
        let keys = masters
            .keys
            .iter()
            .filter_map(|master| Some((master.id, self.derive(master)?)))
            .collect();
        let derived = Arc::new(Derived {
            generation: masters.generation,
            keys,
        });
        self.derived.store(Some(Arc::clone(&derived)));
        Some(derived)
    }

    fn derive(&self, master: &MasterKey) -> Option<LessSafeKey> {
        let prk = Salt::new(HKDF_SHA256, SALT).extract(&master.secret);
        let mut bytes = [0u8; SECRET_LEN];
        prk.expand(&[&self.context], &AES_256_GCM)
            .ok()?
            .fill(&mut bytes)
            .ok()?;
        Some(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &bytes).ok()?,
        ))
    }
}

impl ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        !self.keys.load().keys.is_empty()
    }

    fn lifetime(&self) -> u32 {
        self.keys.load().lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let derived = self.derived()?;
        let (id, key) = derived.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;

        let mut ticket = Vec::with_capacity(KEY_ID_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        ticket.extend_from_slice(id);
        ticket.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&id[..]),
            &mut sealed,
        )
        .ok()?;
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < KEY_ID_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (id, rest) = ticket.split_at(KEY_ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let derived = self.derived()?;
        let (_, key) = derived
            .keys
            .iter()
            .find(|(candidate, _)| candidate[..] == *id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = sealed.to_vec();
        let plain_len = key
            .open_in_place(nonce, Aad::from(id), &mut buffer)
            .ok()?
            .len();
        buffer.truncate(plain_len);
        Some(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(generation: u64, ids: &[u8]) -> SharedKeys {
        let mut payload = 3600u32.to_be_bytes().to_vec();
        for &id in ids {
            payload.extend_from_slice(&[id; KEY_ID_LEN]);
            payload.extend_from_slice(&[id ^ 0x5a; SECRET_LEN]);
        }
        Arc::new(ArcSwap::from_pointee(
            TicketKeys::decode(generation, &payload).unwrap(),
        ))
    }

    #[test]
    fn another_worker_with_the_same_keys_opens_the_ticket() {
        let mine = Ticketer::new(keys(1, &[1]), b"public/http".to_vec());
        let theirs = Ticketer::new(keys(1, &[1]), b"public/http".to_vec());
        let ticket = mine.encrypt(b"session state").unwrap();
        assert_eq!(theirs.decrypt(&ticket).unwrap(), b"session state");
        assert_eq!(theirs.lifetime(), 3600);
    }

    #[test]
    fn tickets_do_not_cross_contexts_or_survive_tampering() {
        let shared = keys(1, &[1]);
        let http = Ticketer::new(Arc::clone(&shared), b"public/http".to_vec());
        let cluster = Ticketer::new(shared, b"cluster/peers".to_vec());
        let mut ticket = http.encrypt(b"state").unwrap();
        assert!(cluster.decrypt(&ticket).is_none());
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert!(http.decrypt(&ticket).is_none());
        assert!(http.decrypt(&ticket[..20]).is_none());
    }

    #[test]
    fn rotation_keeps_the_previous_key_until_it_is_dropped() {
        let shared = keys(1, &[1]);
        let ticketer = Ticketer::new(Arc::clone(&shared), b"ctx".to_vec());
        let old = ticketer.encrypt(b"old").unwrap();

        shared.store(keys(2, &[2, 1]).load_full());
        assert_eq!(ticketer.decrypt(&old).unwrap(), b"old");
        let new = ticketer.encrypt(b"new").unwrap();
        assert_eq!(&new[..KEY_ID_LEN], &[2; KEY_ID_LEN]);

        shared.store(keys(3, &[3, 2]).load_full());
        assert!(ticketer.decrypt(&old).is_none());
        assert_eq!(ticketer.decrypt(&new).unwrap(), b"new");
    }

    #[test]
    fn no_keys_means_no_tickets() {
        let empty: SharedKeys = Arc::new(ArcSwap::from_pointee(TicketKeys::default()));
        let ticketer = Ticketer::new(empty, Vec::new());
        assert!(!ticketer.enabled());
        assert!(ticketer.encrypt(b"x").is_none());
    }
}
