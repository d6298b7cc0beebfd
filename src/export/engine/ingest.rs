//! NDJSON ingest from a stream (an HTTP body, a file): lines parsed as their bytes arrive and
//! stored in groups, each in a transaction of its own, so memory holds at most two groups'
//! updates whatever the input's size (docs/design-notes.md, "Memory").

use tokio::task::JoinHandle;

use super::{Engine, EngineError, IngestReport};
use crate::profile::update::NdjsonParser;

/// A group closes at this many updates…
const GROUP_UPDATES: usize = 5_000;
/// …or this many bytes of their lines, whichever comes first.
const GROUP_BYTES: usize = 4 * 1024 * 1024;

/// Ingest that stopped part way: why, and how many accepted updates were stored before it did
/// (their groups are durable; resending the whole input is safe, as updates merge).
#[derive(Debug)]
pub struct PartlyStored {
    pub error: EngineError,
    pub stored: usize,
}

/// One input being ingested: [`Engine::ingest_session`], then [`IngestSession::feed`] its
/// bytes in any pieces, then [`IngestSession::finish`].
pub struct IngestSession {
    engine: Engine,
    parser: NdjsonParser,
    /// Accepted updates whose group has been written.
    stored: usize,
    /// The group being written while the next is parsed: one at a time, in order, so a
    /// profile named in two groups is updated in the order of its lines.
    writing: Option<(usize, JoinHandle<Result<(), EngineError>>)>,
}

impl Engine {
    /// Start ingesting one input in groups.
    pub fn ingest_session(&self) -> IngestSession {
        IngestSession {
            engine: self.clone(),
            parser: NdjsonParser::default(),
            stored: 0,
            writing: None,
        }
    }
}

impl IngestSession {
    /// Parse `chunk`; once a group is full, wait for the previous group's write and start
    /// this one's.
    pub async fn feed(&mut self, chunk: &[u8]) -> Result<(), PartlyStored> {
        self.parser.feed(chunk);
        let (updates, bytes) = self.parser.ready();
        if updates >= GROUP_UPDATES || bytes >= GROUP_BYTES {
            self.settle().await?;
            let group = self.parser.take_updates();
            let engine = self.engine.clone();
            self.writing = Some((
                group.len(),
                tokio::spawn(async move { engine.store_updates(group).await }),
            ));
        }
        Ok(())
    }

    /// Wait for the group being written, if any. Returns how many accepted updates are stored.
    pub async fn settle(&mut self) -> Result<usize, PartlyStored> {
        if let Some((n, w)) = self.writing.take() {
            let done = w.await.map_err(EngineError::from).and_then(|r| r);
            done.map_err(|error| PartlyStored {
                error,
                stored: self.stored,
            })?;
            self.stored += n;
        }
        Ok(self.stored)
    }

    /// Store what is left (the last line counts without its newline) and report.
    pub async fn finish(mut self) -> Result<IngestReport, PartlyStored> {
        self.settle().await?;
        let parsed = std::mem::take(&mut self.parser).finish();
        let report = IngestReport {
            accepted: self.stored + parsed.updates.len(),
            rejected: parsed.rejected,
            errors_omitted: parsed.errors_omitted(),
            errors: parsed.errors,
        };
        self.engine
            .store_updates(parsed.updates)
            .await
            .map_err(|error| PartlyStored {
                error,
                stored: self.stored,
            })?;
        Ok(report)
    }
}
