//! IMDSv2 session tokens, bound to the pod attachment they were issued to.
//!
//! A token is `<expiry unix seconds>.<hex HMAC-SHA256(expiry, attachment)>` under a key that
//! lives only in this process: no state per token, a token from one pod is worthless to
//! another, and a restart invalidates all tokens (SDKs fetch a new one on 401).

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const MAX_TTL: u32 = 21600;
/// The headers of IMDSv2: the token on every request, its lifetime on `PUT /latest/api/token`.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    Invalid,
    Expired,
}

pub struct Tokens {
    /// HMAC-SHA256 keyed once: each token's MAC starts from a copy, instead of hashing the key's
    /// inner and outer pads again on every request that carries a token.
    keyed: HmacSha256,
}

impl Tokens {
    pub fn new() -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        // A 32-byte key is always a valid HMAC key.
        let keyed = <HmacSha256 as Mac>::new_from_slice(&key).expect("HMAC accepts any key length");
        Ok(Tokens { keyed })
    }

    fn mac(&self, expiry: u64, binding: &str) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(&expiry.to_be_bytes());
        mac.update(binding.as_bytes());
        mac
    }

    pub fn issue(&self, binding: &str, ttl: u32, now_unix: u64) -> String {
        let expiry = now_unix + ttl as u64;
        format!("{expiry}.{}", hex::encode(self.mac(expiry, binding).finalize().into_bytes()))
    }

    pub fn verify(&self, token: &str, binding: &str, now_unix: u64) -> Result<(), TokenError> {
        let (expiry, sig) = token.split_once('.').ok_or(TokenError::Invalid)?;
        let expiry: u64 = expiry.parse().map_err(|_| TokenError::Invalid)?;
        let mut mac = [0u8; 32];
        hex::decode_to_slice(sig, &mut mac).map_err(|_| TokenError::Invalid)?;
        self.mac(expiry, binding).verify_slice(&mac).map_err(|_| TokenError::Invalid)?;
        if now_unix >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// Parses the TTL header of a token PUT: 1..=21600 seconds.
pub fn parse_ttl(value: Option<&str>) -> Option<u32> {
    value?.trim().parse::<u32>().ok().filter(|t| (1..=MAX_TTL).contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_their_pod_and_expire() {
        let t = Tokens::new().unwrap();
        let tok = t.issue("c1/eth0/5", 60, 1000);
        assert_eq!(t.verify(&tok, "c1/eth0/5", 1059), Ok(()));
        assert_eq!(t.verify(&tok, "c1/eth0/5", 1060), Err(TokenError::Expired));
        assert_eq!(t.verify(&tok, "c2/eth0/5", 1000), Err(TokenError::Invalid));
        assert_eq!(t.verify("garbage", "c1/eth0/5", 1000), Err(TokenError::Invalid));
        let forged = tok.replacen("1060", "9999", 1);
        assert_eq!(t.verify(&forged, "c1/eth0/5", 1000), Err(TokenError::Invalid));
        let other = Tokens::new().unwrap();
        assert_eq!(other.verify(&tok, "c1/eth0/5", 1000), Err(TokenError::Invalid), "a restart invalidates tokens");
    }

    #[test]
    fn ttl_must_be_1_to_21600() {
        assert_eq!(parse_ttl(Some("21600")), Some(21600));
        assert_eq!(parse_ttl(Some("1")), Some(1));
        for bad in ["0", "21601", "-1", "abc", ""] {
            assert_eq!(parse_ttl(Some(bad)), None, "{bad}");
        }
        assert_eq!(parse_ttl(None), None);
    }
}
