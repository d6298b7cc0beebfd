//! oauth2-mock-server (npm; a real OAuth2 implementation we did not write) over HTTPS with
//! the PKI's server certificate, logging each token request as a JSON line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::{free_port, wait_for_port, RcgenPki};

pub struct OAuthServer {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OAuthServer {
    pub fn start(pki: &RcgenPki, expires_in: u64, fail_refresh: bool) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oauth");
        assert!(
            dir.join("node_modules/oauth2-mock-server").exists(),
            "run the test command: it installs tests/oauth"
        );
        let port = free_port();
        let log = pki.dir.path().join(format!("oauth-{port}.log"));
        let child = Command::new("node")
            .current_dir(&dir)
            .arg("server.mjs")
            .arg(&pki.files.server_key)
            .arg(&pki.files.server_cert)
            .arg(port.to_string())
            .arg(&log)
            .arg(expires_in.to_string())
            .arg(if fail_refresh { "1" } else { "0" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port);
        OAuthServer { child, port, log }
    }

    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn grants(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| r["grant"].as_str().unwrap().to_owned())
            .collect()
    }
}
