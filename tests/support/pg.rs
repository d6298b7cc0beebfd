//! A PostgreSQL schema of its own for one test, dropped when the test ends. The server is the
//! machine's (127.0.0.1:5432, trust auth, database `test`) unless `SALLYPORT_TEST_PG` names
//! another.

use std::sync::atomic::{AtomicU32, Ordering};

pub fn server_url() -> String {
    std::env::var("SALLYPORT_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub struct PgSchema {
    pub url: String,
    pub name: String,
}

/// Run SQL on a connection of our own, on a thread of its own (callers may be inside a
/// runtime already).
fn run<T: Send + 'static>(
    f: impl FnOnce(tokio_postgres::Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>
        + Send
        + 'static,
) -> T {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&server_url(), tokio_postgres::NoTls)
                .await
                .expect("PostgreSQL at SALLYPORT_TEST_PG or 127.0.0.1:5432 (database test) is needed");
            tokio::spawn(conn);
            f(client).await
        })
    })
    .join()
    .unwrap()
}

impl PgSchema {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sp_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        PgSchema {
            url: server_url(),
            name,
        }
    }

    /// Run statements in this schema.
    pub fn execute(&self, sql: &str) {
        let sql = format!("SET search_path TO {}; {sql}", self.name);
        run(move |c| Box::pin(async move { c.batch_execute(&sql).await.unwrap() }))
    }

    /// The first column of the first row, as text (`SHOW …`, server-wide settings).
    pub fn query_text(&self, sql: &str) -> String {
        let sql = sql.to_owned();
        run(move |c| Box::pin(async move { c.query_one(&sql, &[]).await.unwrap().get::<_, String>(0) }))
    }

    /// The first column of each row, as i64.
    pub fn query_i64(&self, sql: &str) -> Vec<i64> {
        let (sql, schema) = (sql.to_owned(), self.name.clone());
        run(move |c| {
            Box::pin(async move {
                c.batch_execute(&format!("SET search_path TO {schema}"))
                    .await
                    .unwrap();
                c.query(&sql, &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, i64>(0))
                    .collect()
            })
        })
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        run(move |c| {
            Box::pin(async move {
                let _ = c.batch_execute(&sql).await;
            })
        })
    }
}
