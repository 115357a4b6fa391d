//! The plans' store: SQLite or PostgreSQL through sqlx's `Any` driver — one set of queries for
//! both — with the schema created by the migrations in `migrations/` at start-up.
//!
//! A plan's row is keyed by (user, request fingerprint), unique. Concurrent identical
//! submissions are settled by the database, not by retrying: each inserts with
//! `ON CONFLICT (user_id, fingerprint)`, the one that wins stores its plan, and the others,
//! inserting nothing, read the winner's row and return it. No duplicate row, no error.
//!
//! What happens on a conflict depends on what is stored and what arrives:
//!
//! | stored | arriving | result |
//! |---|---|---|
//! | an offline plan | a plan from the upstream | replaces it (same id): the real plan supersedes the template |
//! | a plan from the upstream, younger than the cache's TTL | a plan from the upstream | kept: this is the race (or a second process), and everybody gets the first plan |
//! | a plan from the upstream, as old as the TTL or older | a plan from the upstream | replaces it (same id): a repeat after the cache expired asked for a fresh plan |
//! | anything | an offline plan | kept: a stored plan, even an old one from the upstream, is better than a template |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};
use tower::BoxError;

use super::config::{Backend, DatabaseUrl};
use super::plan::Plan;
use super::request::PlanRequest;

static SQLITE: Migrator = sqlx::migrate!("examples/plan_generator/migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("examples/plan_generator/migrations/postgres");

/// The longest wait for a connection to the database.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most plans `GET /api/plans` lists: the latest.
pub const LIST_LIMIT: i64 = 100;

/// Who wrote a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Source {
    /// The upstream LLM.
    Llm,
    /// The offline templates.
    Offline,
}

impl Source {
    /// As stored and shown: `llm` or `offline`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Llm => "llm",
            Source::Offline => "offline",
        }
    }
}

/// A plan as stored; as JSON in the plan cache in Redis.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredPlan {
    /// Its id.
    pub id: i64,
    /// Who wrote it.
    pub source: Source,
    /// The request it answers, as the user sent it (trimmed).
    pub request: Value,
    /// The plan.
    pub plan: Plan,
    /// When it was first stored, in Unix milliseconds.
    pub created_at: i64,
    /// When its plan was last written.
    pub updated_at: i64,
}

fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

impl StoredPlan {
    /// The plan as the API shows it: `id` and `source` beside the plan.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "source": self.source.as_str(),
            "plan": self.plan,
            "request": self.request,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        })
    }

    fn from_row(row: &AnyRow) -> Result<Self, BoxError> {
        let source = match row.try_get::<String, _>("source")?.as_str() {
            "llm" => Source::Llm,
            "offline" => Source::Offline,
            other => return Err(format!("unknown plan source {other:?}").into()),
        };
        Ok(StoredPlan {
            id: row.try_get("id")?,
            source,
            request: serde_json::from_str(&row.try_get::<String, _>("request")?)?,
            plan: serde_json::from_str(&row.try_get::<String, _>("plan")?)?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// A plan about to be stored.
#[derive(Debug, Clone, Copy)]
pub struct NewPlan<'a> {
    /// Its user.
    pub user: &'a str,
    /// Its request's fingerprint.
    pub fingerprint: &'a str,
    /// Its request.
    pub request: &'a PlanRequest,
    /// The plan.
    pub plan: &'a Plan,
}

const COLUMNS: &str = "id, source, request, plan, created_at, updated_at";

/// The plans' table.
#[derive(Debug, Clone)]
pub struct Plans {
    pool: AnyPool,
    backend: Backend,
    replace_after: Duration,
}

fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

impl Plans {
    /// Connects to the database at `url` and brings its schema up to date. A plan from the
    /// upstream replaces a stored one from the upstream once that is `replace_after` old (the
    /// cache's TTL; see the [module docs](self)).
    pub async fn open(url: &DatabaseUrl, replace_after: Duration) -> Result<Plans, BoxError> {
        sqlx::any::install_default_drivers();
        // One connection first, for its own error: the pool would only say it timed out.
        let unreachable = |why: String| format!("cannot open the database {url}: {why}");
        let first = tokio::time::timeout(CONNECT_TIMEOUT, AnyConnection::connect(url.url()))
            .await
            .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|err| unreachable(err.to_string()))?;
        let _ = first.close().await;
        let backend = url.backend();
        let options = AnyPoolOptions::new()
            .acquire_timeout(CONNECT_TIMEOUT)
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            });
        let options = match backend {
            // Readers do not wait for the writer, and a writer waits for another (up to sqlx's
            // busy timeout of 5 s) instead of failing.
            Backend::Sqlite => options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    Ok(())
                })
            }),
            Backend::Postgres => options,
        };
        let pool = options
            .connect(url.url())
            .await
            .map_err(|err| unreachable(err.to_string()))?;
        let migrator = match backend {
            Backend::Sqlite => &SQLITE,
            Backend::Postgres => &POSTGRES,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|err| format!("cannot create the schema in {url}: {err}"))?;
        Ok(Plans {
            pool,
            backend,
            replace_after,
        })
    }

    /// The kind of database.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Stores a plan written by the upstream (see the [module docs](self) for a conflict),
    /// and returns the stored row.
    pub async fn store_llm(&self, new: NewPlan<'_>) -> Result<StoredPlan, BoxError> {
        let sql = format!(
            "INSERT INTO plans (user_id, fingerprint, source, request, plan, created_at, updated_at) \
             VALUES ($1, $2, 'llm', $3, $4, $5, $5) \
             ON CONFLICT (user_id, fingerprint) DO UPDATE \
             SET source = excluded.source, request = excluded.request, plan = excluded.plan, \
                 updated_at = excluded.updated_at \
             WHERE plans.source = 'offline' OR plans.updated_at <= excluded.updated_at - $6 \
             RETURNING {COLUMNS}"
        );
        let replace_after = i64::try_from(self.replace_after.as_millis()).unwrap_or(i64::MAX);
        let inserted = sqlx::query(&sql)
            .bind(new.user)
            .bind(new.fingerprint)
            .bind(serde_json::to_string(new.request)?)
            .bind(serde_json::to_string(new.plan)?)
            .bind(now_ms())
            .bind(replace_after)
            .fetch_optional(&self.pool)
            .await?;
        self.stored_or_winner(inserted, new).await
    }

    /// Stores an offline plan unless a plan for the same request is stored already, and
    /// returns the stored row: the new one, or the one found.
    pub async fn store_offline(&self, new: NewPlan<'_>) -> Result<StoredPlan, BoxError> {
        let sql = format!(
            "INSERT INTO plans (user_id, fingerprint, source, request, plan, created_at, updated_at) \
             VALUES ($1, $2, 'offline', $3, $4, $5, $5) \
             ON CONFLICT (user_id, fingerprint) DO NOTHING \
             RETURNING {COLUMNS}"
        );
        let inserted = sqlx::query(&sql)
            .bind(new.user)
            .bind(new.fingerprint)
            .bind(serde_json::to_string(new.request)?)
            .bind(serde_json::to_string(new.plan)?)
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .await?;
        self.stored_or_winner(inserted, new).await
    }

    /// The row an insert returned, or — when it inserted nothing because of the unique
    /// constraint — the row that was there.
    async fn stored_or_winner(
        &self,
        inserted: Option<AnyRow>,
        new: NewPlan<'_>,
    ) -> Result<StoredPlan, BoxError> {
        if let Some(row) = inserted {
            return StoredPlan::from_row(&row);
        }
        let sql = format!("SELECT {COLUMNS} FROM plans WHERE user_id = $1 AND fingerprint = $2");
        let row = sqlx::query(&sql)
            .bind(new.user)
            .bind(new.fingerprint)
            .fetch_one(&self.pool)
            .await?;
        StoredPlan::from_row(&row)
    }

    /// The latest [`LIST_LIMIT`] plans of `user`, the most recently written first.
    pub async fn list(&self, user: &str) -> Result<Vec<StoredPlan>, BoxError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM plans WHERE user_id = $1 \
             ORDER BY updated_at DESC, id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(user)
            .bind(LIST_LIMIT)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(StoredPlan::from_row).collect()
    }

    /// Plan `id`, if it is `user`'s.
    pub async fn get(&self, user: &str, id: i64) -> Result<Option<StoredPlan>, BoxError> {
        let sql = format!("SELECT {COLUMNS} FROM plans WHERE id = $1 AND user_id = $2");
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(user)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(StoredPlan::from_row).transpose()
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), BoxError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Waits for the connections in use to be returned, and closes them all.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
