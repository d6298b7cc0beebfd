//! Standard Webhooks signing (https://www.standardwebhooks.com): `webhook-id`,
//! `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256(id.timestamp.body)>`, so
//! receivers can authenticate the payload itself in addition to the mTLS channel. The id stays
//! the same across retries and replays; the timestamp and signature are fresh per attempt.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::hmac;

/// Signs payloads with one secret. `Debug` never shows the key.
pub struct WebhookSigner {
    key: hmac::Key,
}

impl std::fmt::Debug for WebhookSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSigner(<redacted>)")
    }
}

impl WebhookSigner {
    /// A secret as the spec formats it: `whsec_` followed by base64 of 24 to 64 random bytes
    /// (the prefix is optional, as in the reference implementations).
    pub fn from_secret(secret: &str) -> Result<Self, String> {
        let b64 = secret.trim().strip_prefix("whsec_").unwrap_or(secret.trim());
        let key = B64
            .decode(b64)
            .map_err(|_| "the signing secret is not base64 after the whsec_ prefix".to_owned())?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "the signing secret decodes to {} bytes; Standard Webhooks wants 24 to 64",
                key.len()
            ));
        }
        Ok(WebhookSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        })
    }

    /// The `webhook-signature` value for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(id.as_bytes());
        ctx.update(b".");
        ctx.update(timestamp.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body);
        format!("v1,{}", B64.encode(ctx.sign().as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_test_vector_reproduces_exactly() {
        let s = WebhookSigner::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid");
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let bare = WebhookSigner::from_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("prefix optional");
        assert_eq!(bare.sign("a", 1, b"b"), s.sign("a", 1, b"b"));
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(WebhookSigner::from_secret("whsec_!!!")
            .expect_err("refused")
            .contains("not base64"));
        assert!(WebhookSigner::from_secret("whsec_c2hvcnQ=")
            .expect_err("refused")
            .contains("24 to 64"));
    }
}
