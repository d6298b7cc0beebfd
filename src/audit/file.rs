//! An audit chain in an append-only file: one JSON line per record,
//! `{"seq":N,"prev":"…","hash":"…","mac":…,"record":{…}}`, linked and verified exactly as the
//! store's chains are (the hash covers the record's text as it stands in the line). The
//! sidecar writes here when `[sidecar] audit_file` is set: a batch is one `write`, where a
//! store append is a B-tree insert per record, a WAL write and a checkpoint that writes the
//! same bytes again. The lines are what `sallyport audit export` prints, so a log shipper can
//! forward the file as it grows.
//!
//! One writer at a time: `<file>.lock` is locked (`flock`) while a writer lives. At a size
//! limit the file is rotated: renamed `<file>.<last seq, 12 digits>`, and a new file continues
//! the chain. A crash can leave a torn last line (never a torn record in the middle); opening
//! the file again removes it, and readers skip it meanwhile. Durability matches the store's relaxed commits: each
//! batch survives a process crash once written; the data reaches the disk within a second
//! (`fdatasync`), so a power loss may forget the last second.
//!
//! Must never: hold a secret, a token or a payload body (records are `AuditRecord`s).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Chain, ChainedRecord, GENESIS};

/// Every line starts so; a torn tail that does not is not ours to cut.
const LINE_START: &[u8] = b"{\"seq\":";
/// How far from the end the last complete line is looked for (lines are well under 4 KiB).
const TAIL: u64 = 64 * 1024;
/// Longest a written batch waits for `fdatasync`.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// What the syncer thread shares with the writer: a handle on the file and whether lines were
/// written since the last `fdatasync`.
struct Dirty {
    file: File,
    dirty: AtomicBool,
}

impl Dirty {
    fn sync(&self) -> std::io::Result<()> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.file.sync_data() {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Dirty {
    /// The shared state for `file`, with its syncer running.
    fn start(path: &Path, file: &File) -> std::io::Result<Arc<Dirty>> {
        let dirty = Arc::new(Dirty {
            file: file.try_clone()?,
            dirty: AtomicBool::new(false),
        });
        start_syncer(path, Arc::downgrade(&dirty))?;
        Ok(dirty)
    }
}

/// Flush `dirty`'s file to disk once a second while it has unsynced lines, from a thread of
/// its own: the writer never waits for the disk, and the last batch before traffic stops is
/// flushed too. The thread ends within a second of its file being dropped (closed or rotated).
fn start_syncer(path: &Path, dirty: Weak<Dirty>) -> std::io::Result<()> {
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name("sallyport-fsync".into())
        .spawn(move || loop {
            std::thread::sleep(SYNC_EVERY);
            let Some(d) = dirty.upgrade() else { return };
            if let Err(e) = d.sync() {
                tracing::error!(path = %shown, error = %e, "the audit file could not be flushed to disk");
            }
        })
        .map(drop)
}

#[derive(Deserialize)]
struct Line<'a> {
    seq: i64,
    prev: &'a str,
    hash: &'a str,
    mac: Option<&'a str>,
    #[serde(borrow)]
    record: &'a RawValue,
}

impl Line<'_> {
    fn chained(&self) -> ChainedRecord {
        ChainedRecord {
            seq: self.seq,
            record: self.record.get().to_owned(),
            prev: self.prev.to_owned(),
            hash: self.hash.to_owned(),
            mac: self.mac.map(str::to_owned),
        }
    }
}

/// The writer's end of an audit file.
pub struct AuditFile {
    path: PathBuf,
    /// `<path>.lock`, held (`flock`) while this writer lives: one writer per chain, across
    /// rotations.
    _lock: File,
    file: File,
    /// Bytes in the file that end a complete line (where a failed write is cut back to).
    len: u64,
    /// Rotate once the file holds this many bytes (0: never).
    rotate_at: u64,
    seq: i64,
    hash: String,
    chain: Chain,
    /// The batch's lines.
    buf: Vec<u8>,
    /// One record's JSON, as hashed.
    text: Vec<u8>,
    dirty: Arc<Dirty>,
}

impl std::fmt::Debug for AuditFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditFile")
            .field("path", &self.path)
            .field("seq", &self.seq)
            .finish()
    }
}

/// Open (creating, mode 0600) `path` for appending.
fn open_append(path: &Path) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

impl AuditFile {
    /// Open `path` for appending (created mode 0600 when missing) and continue its chain —
    /// from the last rotated segment when the file itself is new. `rotate_at`: bytes after
    /// which the file is renamed to a segment and a new one continues the chain (0: never).
    /// Fails when another process writes the chain, or when the last line is not an audit line.
    pub fn open(path: &Path, chain: Chain, rotate_at: u64) -> Result<Self, String> {
        let err = |e: &dyn std::fmt::Display| format!("audit file {}: {e}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let lock = open_append(&sibling(path, "lock")).map_err(|e| err(&e))?;
        lock.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => {
                err(&"another process is writing it (each sidecar needs a file of its own)")
            }
            std::fs::TryLockError::Error(e) => err(&e),
        })?;
        let mut file = open_append(path).map_err(|e| err(&e))?;
        let (len, mut seq, mut hash, torn) = tail(&mut file).map_err(|e| err(&e))?;
        if torn > 0 {
            file.set_len(len).map_err(|e| err(&e))?;
            tracing::warn!(path = %path.display(), bytes = torn, "removed a torn last line from the audit file (a write cut short by a crash)");
        }
        if len == 0 {
            // A new file after a rotation (or a crash between the rename and the first write):
            // the chain goes on from the newest segment.
            if let Some(last) = segments(path).map_err(|e| err(&e))?.pop() {
                let mut f = File::open(&last).map_err(|e| err(&e))?;
                (_, seq, hash, _) =
                    tail(&mut f).map_err(|e| format!("audit file {}: {e}", last.display()))?;
            }
        }
        let dirty = Dirty::start(path, &file).map_err(|e| err(&e))?;
        Ok(AuditFile {
            path: path.to_owned(),
            _lock: lock,
            file,
            len,
            rotate_at,
            seq,
            hash,
            chain,
            buf: Vec::with_capacity(64 * 1024),
            text: Vec::with_capacity(1024),
            dirty,
        })
    }

    /// The last record's sequence number (0 when empty).
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// Link `records` after the last one and write them in one go. On failure nothing of the
    /// batch stays in the file and the chain's head does not move.
    pub fn append(&mut self, records: &[super::AuditRecord<'_>]) -> std::io::Result<()> {
        self.buf.clear();
        let (mut seq, mut hash) = (self.seq, self.hash.clone());
        for r in records {
            self.text.clear();
            serde_json::to_writer(&mut self.text, r).map_err(std::io::Error::other)?;
            seq += 1;
            let (next, mac) = self.chain.seal(seq, &hash, &self.text);
            write_line(&mut self.buf, seq, &hash, &next, mac.as_deref(), &self.text);
            hash = next;
        }
        if let Err(e) = self.file.write_all(&self.buf) {
            // A short write leaves part of the batch: cut it off so the file ends on a line.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += self.buf.len() as u64;
        (self.seq, self.hash) = (seq, hash);
        self.dirty.dirty.store(true, Ordering::Release);
        if self.rotate_at > 0 && self.len >= self.rotate_at {
            if let Err(e) = self.rotate() {
                // The batch is written; the chain goes on in the file as it is.
                tracing::error!(path = %self.path.display(), error = %e, "the audit file could not be rotated");
            }
        }
        Ok(())
    }

    /// Flush written lines to the disk now (the syncer thread does it within a second anyway).
    pub fn sync(&self) -> std::io::Result<()> {
        self.dirty.sync()
    }

    /// Close the file as the segment `<path>.<last seq>` and continue the chain in a new file
    /// at `path`. The segment is on disk before it is renamed.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.dirty.sync()?;
        std::fs::rename(&self.path, segment_path(&self.path, self.seq))?;
        // From here a crash leaves no file at `path`; `open` then continues from the segment.
        let file = open_append(&self.path)?;
        self.dirty = Dirty::start(&self.path, &file)?;
        self.file = file;
        self.len = 0;
        tracing::info!(path = %self.path.display(), last_seq = self.seq, "rotated the audit file");
        Ok(())
    }
}

impl Drop for AuditFile {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(path = %self.path.display(), error = %e, "the audit file could not be flushed to disk");
        }
    }
}

/// `<path>.<suffix>`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

/// Where a segment whose last record is `seq` goes: `<path>.<seq, 12 digits>` (names sort in
/// chain order).
fn segment_path(path: &Path, seq: i64) -> PathBuf {
    sibling(path, &format!("{seq:012}"))
}

/// The rotated segments of `path`, oldest first.
pub fn segments(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(name))
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        if rest.len() >= 12 && rest.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(seq) = rest.parse() {
                found.push((seq, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// One line, as `audit export` prints a record (plus its MAC).
fn write_line(out: &mut Vec<u8>, seq: i64, prev: &str, hash: &str, mac: Option<&str>, record: &[u8]) {
    use std::io::Write as _;
    out.extend_from_slice(LINE_START);
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{seq}");
    out.extend_from_slice(b",\"prev\":\"");
    out.extend_from_slice(prev.as_bytes());
    out.extend_from_slice(b"\",\"hash\":\"");
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\",\"mac\":");
    match mac {
        Some(m) => {
            out.push(b'"');
            out.extend_from_slice(m.as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"record\":");
    out.extend_from_slice(record);
    out.extend_from_slice(b"}\n");
}

/// The end of the last complete line, its sequence number and hash, and how many bytes
/// follow it (a torn line).
fn tail<F: Read + Seek>(file: &mut F) -> Result<(u64, i64, String, u64), String> {
    let size = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if size == 0 {
        return Ok((0, 0, GENESIS.to_owned(), 0));
    }
    let from = size.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(from)).map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity((size - from) as usize);
    file.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn = &buf[end..];
    if !torn.is_empty() && !torn.starts_with(LINE_START) && !LINE_START.starts_with(torn) {
        return Err("it does not end with an audit line (is this the right file?)".into());
    }
    if end == 0 {
        if from > 0 {
            return Err(format!(
                "no line ends in its last {TAIL} bytes: not an audit file"
            ));
        }
        return Ok((0, 0, GENESIS.to_owned(), torn.len() as u64));
    }
    let body = &buf[..end - 1];
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if start == 0 && from > 0 {
        return Err(format!(
            "its last line is longer than {TAIL} bytes: not an audit file"
        ));
    }
    let line: Line<'_> = serde_json::from_slice(&body[start..])
        .map_err(|e| format!("its last line is not an audit record ({e})"))?;
    Ok((
        from + end as u64,
        line.seq,
        line.hash.to_owned(),
        torn.len() as u64,
    ))
}

/// Read the chain of the audit file `path` — its rotated segments, oldest first, then the file
/// itself — record by record, handing each to `each`. See [`read`].
pub fn read_chain<E: From<String>>(
    path: &Path,
    mut each: impl FnMut(ChainedRecord) -> Result<(), E>,
) -> Result<(), E> {
    let segments = segments(path).map_err(|e| E::from(format!("audit file {}: {e}", path.display())))?;
    for segment in &segments {
        read(segment, &mut each)?;
    }
    if path.exists() {
        read(path, &mut each)?;
    }
    Ok(())
}

/// Read the records in the file `path`, handing each to `each`. A torn last line (one a
/// writer has not finished) is not read. Stops at the first error `each` returns; any line
/// that is not an audit record is an error naming its line number.
pub fn read<E: From<String>>(path: &Path, each: impl FnMut(ChainedRecord) -> Result<(), E>) -> Result<(), E> {
    let file = File::open(path).map_err(|e| E::from(format!("audit file {}: {e}", path.display())))?;
    read_lines(BufReader::with_capacity(256 * 1024, file), path, each)
}

/// [`read`] from `reader`, the file `path`'s content.
fn read_lines<E: From<String>>(
    mut reader: impl BufRead,
    path: &Path,
    mut each: impl FnMut(ChainedRecord) -> Result<(), E>,
) -> Result<(), E> {
    let err = |e: &dyn std::fmt::Display| E::from(format!("audit file {}: {e}", path.display()));
    let mut line = Vec::new();
    let mut n = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(|e| err(&e))? == 0 {
            return Ok(());
        }
        n += 1;
        if line.last() != Some(&b'\n') {
            return Ok(());
        }
        let parsed: Line<'_> = serde_json::from_slice(&line[..line.len() - 1])
            .map_err(|e| err(&format_args!("line {n} is not an audit record ({e})")))?;
        each(parsed.chained())?;
    }
}

/// Entry point for the audit-file fuzz target: the bytes read as an audit file (each record
/// verified as `audit verify` would) and searched for the writer's resume point, as a reopened
/// file is. Every record read came from a complete line and reads back the same once written
/// out again; the resume point ends a line and accounts for every byte. Panics on a broken
/// invariant.
pub fn fuzz_entry(data: &[u8]) {
    let path = Path::new("fuzz.log");
    let chain = Chain::new(Some(b"fuzz-audit-key"));
    let mut verifier = super::Verifier::new(&chain);
    let mut records = Vec::new();
    let _ = read_lines::<String>(std::io::Cursor::new(data), path, |r| {
        let _ = verifier.push(&r);
        records.push(r);
        Ok(())
    });
    let lines = data.iter().filter(|b| **b == b'\n').count();
    assert!(records.len() <= lines, "a record without its newline");
    for r in &records {
        let mut out = Vec::new();
        write_line(
            &mut out,
            r.seq,
            &r.prev,
            &r.hash,
            r.mac.as_deref(),
            r.record.as_bytes(),
        );
        let mut again = Vec::new();
        let read_back = read_lines::<String>(std::io::Cursor::new(&out), path, |r| {
            again.push(r);
            Ok(())
        });
        assert!(read_back.is_ok(), "{read_back:?}");
        assert_eq!(again.as_slice(), std::slice::from_ref(r));
    }
    if let Ok((end, seq, hash, torn)) = tail(&mut std::io::Cursor::new(data)) {
        assert_eq!(
            end + torn,
            data.len() as u64,
            "bytes lost between the end and the torn tail"
        );
        let end = usize::try_from(end).unwrap_or(usize::MAX);
        if end == 0 {
            assert_eq!((seq, hash.as_str()), (0, GENESIS));
        } else {
            assert_eq!(
                data.get(end - 1),
                Some(&b'\n'),
                "the resume point is not a line's end"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{verify, AuditRecord, Verifier};

    fn rec(i: u32) -> AuditRecord<'static> {
        AuditRecord {
            at: 1_764_662_400_000 + i64::from(i),
            dataflow: "sidecar:/".into(),
            destination: "rx.example:443".into(),
            resolved_ip: Some("127.0.0.1".into()),
            source_ip: None,
            profile_id: "".into(),
            payload_sha256: "".into(),
            idempotency_key: "".into(),
            attempt: 1,
            outcome: crate::audit::Outcome::Proxied,
            error_kind: None,
            http_status: Some(200),
            latency_ms: 0.5,
            peer_cert_sha256: None,
            auth: "none".into(),
            trigger: None,
            trace_id: None,
        }
    }

    /// Every record of the chain at `path` (its segments, then the file).
    fn chain_of(path: &Path) -> Vec<ChainedRecord> {
        let mut out = Vec::new();
        read_chain::<String>(path, |r| {
            out.push(r);
            Ok(())
        })
        .expect("readable");
        out
    }

    fn key() -> Chain {
        Chain::new(Some(b"audit-key-0123456789abcdef"))
    }

    #[test]
    fn batches_append_one_chain_that_continues_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("logs/sidecar-audit.jsonl");
        let mut f = AuditFile::open(&path, key(), 0).expect("open");
        f.append(&[rec(1), rec(2)]).expect("append");
        f.append(&[rec(3)]).expect("append");
        drop(f);
        let mut f = AuditFile::open(&path, key(), 0).expect("reopen");
        assert_eq!(f.seq(), 3);
        f.append(&[rec(4)]).expect("append");
        drop(f);
        let records = chain_of(&path);
        assert_eq!(records.len(), 4);
        assert_eq!(verify(&records, &key()), Ok(4));
        // Each line is plain JSON with the record as an object, as `audit export` prints it.
        let text = std::fs::read_to_string(&path).expect("read");
        let first: serde_json::Value =
            serde_json::from_str(text.lines().next().expect("a line")).expect("json");
        assert_eq!(first["seq"], 1);
        assert_eq!(first["record"]["dataflow"], "sidecar:/");
        assert_eq!(first["prev"], GENESIS);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn an_edited_or_removed_line_breaks_the_chain_at_that_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.jsonl");
        let mut f = AuditFile::open(&path, key(), 0).expect("open");
        f.append(&[rec(1), rec(2), rec(3), rec(4)]).expect("append");
        drop(f);
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let check = |body: String| {
            std::fs::write(&path, body).expect("write");
            verify(&chain_of(&path), &key()).err().map(|b| b.seq)
        };
        let second = lines[1].replace("\"httpStatus\":200", "\"httpStatus\":500");
        assert_ne!(second, lines[1]);
        let edited = format!("{}\n{second}\n{}\n{}\n", lines[0], lines[2], lines[3]);
        assert_eq!(check(edited), Some(2));
        let removed = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3]);
        assert_eq!(check(removed), Some(2));
        assert_eq!(check(text.clone()), None);
        // Rewritten consistently, but without the key: the first MAC fails.
        let _ = std::fs::remove_file(&path);
        let mut forged = AuditFile::open(&path, Chain::new(None), 0).expect("open");
        forged.append(&[rec(1)]).expect("append");
        drop(forged);
        let forged = std::fs::read_to_string(&path).expect("read");
        assert_eq!(check(forged), Some(1));
    }

    #[test]
    fn a_torn_last_line_is_skipped_by_readers_and_cut_by_the_next_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.jsonl");
        let mut f = AuditFile::open(&path, key(), 0).expect("open");
        f.append(&[rec(1), rec(2)]).expect("append");
        drop(f);
        let whole = std::fs::read_to_string(&path).expect("read");
        let second = whole.lines().nth(1).expect("line 2").to_owned();
        // The crash came halfway through writing record 3.
        let torn = format!("{whole}{}", &second[..second.len() / 2]);
        std::fs::write(&path, &torn).expect("write");
        assert_eq!(chain_of(&path).len(), 2);
        let mut f = AuditFile::open(&path, key(), 0).expect("reopen");
        assert_eq!(f.seq(), 2);
        f.append(&[rec(3)]).expect("append");
        drop(f);
        let records = chain_of(&path);
        assert_eq!(verify(&records, &key()), Ok(3));
    }

    #[test]
    fn rotation_continues_one_chain_across_segments_and_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sidecar-audit.jsonl");
        // About three lines per file.
        let mut f = AuditFile::open(&path, key(), 1200).expect("open");
        for i in 1..=10 {
            f.append(&[rec(i)]).expect("append");
        }
        drop(f);
        let segs = segments(&path).expect("segments");
        assert!(segs.len() >= 2, "{segs:?}");
        let names: Vec<String> = segs
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert!(
            names[0].starts_with("sidecar-audit.jsonl.0000000000"),
            "{names:?}"
        );
        let records = chain_of(&path);
        assert_eq!(records.len(), 10);
        assert_eq!(verify(&records, &key()), Ok(10));

        // A crash between the rename and the first write leaves no live file: the chain goes
        // on from the newest segment.
        std::fs::rename(&path, segment_path(&path, 10)).expect("rename");
        let mut f = AuditFile::open(&path, key(), 1200).expect("reopen");
        assert_eq!(f.seq(), 10);
        f.append(&[rec(11)]).expect("append");
        drop(f);
        assert_eq!(verify(&chain_of(&path), &key()), Ok(11));

        // The oldest segment archived: what is left verifies from its first record on.
        std::fs::remove_file(&segs[0]).expect("remove");
        let kept = chain_of(&path);
        let first = &kept[0];
        assert!(first.seq > 1);
        let keyed = key();
        let mut v = Verifier::resume(&keyed, first.seq - 1, &first.prev);
        for r in &kept {
            v.push(r).expect("verifies");
        }
        assert_eq!(v.verified() as usize, kept.len());

        // A segment missing in the middle is a gap the chain names.
        let segs = segments(&path).expect("segments");
        std::fs::remove_file(&segs[0]).expect("remove");
        let mut gap = vec![kept[0].clone()];
        gap.extend(chain_of(&path));
        let mut v = Verifier::resume(&keyed, kept[0].seq - 1, &kept[0].prev);
        let broken = gap.iter().try_for_each(|r| v.push(r)).expect_err("gap");
        assert!(broken.reason.contains("missing"), "{broken:?}");
    }

    #[test]
    fn a_second_writer_and_a_file_that_is_not_an_audit_log_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.jsonl");
        let _first = AuditFile::open(&path, key(), 0).expect("open");
        let second = AuditFile::open(&path, key(), 0).expect_err("locked");
        assert!(second.contains("another process is writing it"), "{second}");
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, "shopping list\nmilk\n").expect("write");
        let e = AuditFile::open(&other, key(), 0).expect_err("not ours");
        assert!(e.contains("not an audit record"), "{e}");
        std::fs::write(&other, "no newline at all").expect("write");
        let e = AuditFile::open(&other, key(), 0).expect_err("not ours");
        assert!(e.contains("right file"), "{e}");
        // Nothing was cut from either.
        assert_eq!(
            std::fs::read_to_string(&other).expect("read"),
            "no newline at all"
        );
    }
}
