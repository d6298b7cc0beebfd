//! Operational events at a webhook: the reference Standard Webhooks library (`standardwebhooks`
//! from PyPI, installed under target/ when missing) verifies what we signed.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::path::{Path, PathBuf};

use sallyport::receiver::Receiver;
use serde_json::Value;

/// The Standard Webhooks spec's published test secret.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A Python with the reference `standardwebhooks` package (installed under target/ when
/// missing, by the same script `scripts/test.sh` runs).
pub fn reference_python() -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/standardwebhooks.sh"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "installing standardwebhooks: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// What `standardwebhooks.Webhook(secret).verify(body, headers)` says of one request: the
/// payload it verified, or the error it raised.
pub fn reference_verify(
    python: &Path,
    r: &sallyport::receiver::Received,
    body: &[u8],
) -> Result<Value, String> {
    let headers: serde_json::Map<String, Value> = r
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("webhook-"))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let script = "import json, sys\n\
                  from standardwebhooks.webhooks import Webhook\n\
                  headers = json.loads(sys.argv[2])\n\
                  body = sys.stdin.buffer.read()\n\
                  try:\n    print(json.dumps(Webhook(sys.argv[1]).verify(body, headers)))\n\
                  except Exception as e:\n    print(type(e).__name__ + ': ' + str(e), file=sys.stderr); sys.exit(1)\n";
    let mut child = std::process::Command::new(python)
        .args(["-c", script, SECRET, &Value::Object(headers).to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub fn header<'a>(r: &'a sallyport::receiver::Received, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The events of type `kind` the hook received, parsed, with their requests.
pub fn events_of(hook: &Receiver, kind: &str) -> Vec<(sallyport::receiver::Received, Value)> {
    hook.received()
        .into_iter()
        .filter_map(|r| {
            let v: Value = serde_json::from_slice(&r.body).ok()?;
            (v["type"] == kind).then_some((r, v))
        })
        .collect()
}

/// `[events]` for `hook`, with the secret in `events.secret` under `dir`.
pub fn events_table(dir: &Path, hook: &Receiver) -> String {
    std::fs::write(dir.join("events.secret"), SECRET).unwrap();
    format!(
        "[events]\nwebhook = \"{}\"\nca = \"ca.pem\"\nsigning_secret_file = \"events.secret\"\n",
        hook.url("/events")
    )
}
