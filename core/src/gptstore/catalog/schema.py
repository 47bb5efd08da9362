"""The catalog's SQLite schema and its migrations.

``PRAGMA user_version`` holds the schema version; :data:`MIGRATIONS` [i] takes a catalog from
version i to i + 1. Add a migration at the end; never edit one that has shipped.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1
    """
    -- Only the columns filters and rankings read, so rows stay narrow; the rest is in card_docs.
    CREATE TABLE cards (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        listed INTEGER NOT NULL DEFAULT 1,
        parameters INTEGER,
        size_log REAL,
        dtype_bytes REAL,
        context_length INTEGER,
        license TEXT,
        quality REAL,
        popularity_score REAL NOT NULL DEFAULT 0,
        updated_days REAL,
        language_bits INTEGER NOT NULL DEFAULT 0,
        task_bits INTEGER NOT NULL DEFAULT 0
    );
    -- Covers every column that filters and built-in rankings read (but source, metric floors and
    -- text), so a selection without a task scans this index and never the table.
    CREATE INDEX cards_select ON cards (
        listed, parameters, context_length, license, dtype_bytes, size_log, quality,
        popularity_score, updated_days, language_bits
    );
    CREATE INDEX cards_source ON cards (source, listed);
    -- The whole card (JSON), its ids and sync bookkeeping; card_id is cards.id.
    CREATE TABLE card_docs (
        card_id INTEGER PRIMARY KEY,
        uid TEXT NOT NULL UNIQUE,
        model_id TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        synced_at TEXT NOT NULL,
        delisted_at TEXT,
        card TEXT NOT NULL
    );
    CREATE INDEX card_docs_model_id ON card_docs (model_id);
    -- One row per (task, card) holding the selection columns of cards: nearly every requirement
    -- names a task, and these indexes seek straight to its cards by license or by size.
    CREATE TABLE card_tasks (
        task TEXT NOT NULL,
        id INTEGER NOT NULL,
        source TEXT NOT NULL,
        listed INTEGER NOT NULL,
        parameters INTEGER,
        size_log REAL,
        dtype_bytes REAL,
        context_length INTEGER,
        license TEXT,
        quality REAL,
        popularity_score REAL NOT NULL,
        updated_days REAL,
        language_bits INTEGER NOT NULL
    );
    CREATE INDEX card_tasks_by_license ON card_tasks (
        task, listed, license, parameters, context_length, dtype_bytes, size_log, quality,
        popularity_score, updated_days, language_bits, id
    );
    CREATE INDEX card_tasks_by_size ON card_tasks (
        task, listed, parameters, license, context_length, dtype_bytes, size_log, quality,
        popularity_score, updated_days, language_bits, id
    );
    CREATE INDEX card_tasks_card ON card_tasks (id);
    -- Tasks and languages get one bit each in task_bits / language_bits (the first 62 of each
    -- kind), so filtering by them is a bit test inside an index; card_tasks and card_languages
    -- stay complete for values past the 62nd.
    CREATE TABLE vocabulary (
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        bit INTEGER NOT NULL,
        PRIMARY KEY (kind, value)
    ) WITHOUT ROWID;
    CREATE TABLE card_languages (
        language TEXT NOT NULL,
        card_id INTEGER NOT NULL,
        PRIMARY KEY (language, card_id)
    ) WITHOUT ROWID;
    CREATE INDEX card_languages_card ON card_languages (card_id);
    -- Normalized (0-1, higher is better) metric values, one row per (metric, card) with the
    -- selection columns of cards: a requirement with a metric floor seeks straight to the cards
    -- above it (tasks are then a bit test in task_bits).
    CREATE TABLE card_metrics (
        name TEXT NOT NULL,
        id INTEGER NOT NULL,
        value REAL NOT NULL,
        source TEXT NOT NULL,
        listed INTEGER NOT NULL,
        parameters INTEGER,
        size_log REAL,
        dtype_bytes REAL,
        context_length INTEGER,
        license TEXT,
        quality REAL,
        popularity_score REAL NOT NULL,
        updated_days REAL,
        language_bits INTEGER NOT NULL,
        task_bits INTEGER NOT NULL,
        PRIMARY KEY (name, id)
    ) WITHOUT ROWID;
    CREATE INDEX card_metrics_card ON card_metrics (id);
    CREATE INDEX card_metrics_select ON card_metrics (
        name, listed, value, parameters, license, context_length, dtype_bytes, size_log, quality,
        popularity_score, updated_days, language_bits, task_bits
    );
    CREATE VIRTUAL TABLE cards_fts USING fts5 (
        name, description, tags, tokenize = 'unicode61 remove_diacritics 2'
    );
    CREATE TABLE sync_runs (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        added INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        unchanged INTEGER NOT NULL,
        delisted INTEGER NOT NULL,
        refused INTEGER NOT NULL,
        error TEXT
    );
    """,
    # 1 -> 2
    """
    -- Figures measured on this host (gptstore eval), raw: perplexity ceilings and speed floors
    -- filter on them. Named FIGURE@BACKEND; only the store source's cards have any.
    CREATE TABLE card_measured (
        name TEXT NOT NULL,
        id INTEGER NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (name, id)
    ) WITHOUT ROWID;
    CREATE INDEX card_measured_card ON card_measured (id);
    INSERT OR REPLACE INTO card_measured (name, id, value)
        SELECT json_extract(m.value, '$.name'), d.card_id, json_extract(m.value, '$.value')
        -- A document SQLite cannot read as JSON (NaN in an older one) is left to the next sync.
        FROM card_docs d,
            json_each(CASE WHEN json_valid(d.card) THEN d.card ELSE '{}' END, '$.metrics') m
        WHERE json_extract(m.value, '$.origin') = 'measured'
            AND json_extract(m.value, '$.value') IS NOT NULL;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

#: Columns copied from a card into every selection table (card_tasks has no task_bits: each of
#: its rows is one task).
CARD_COLUMNS = (
    "source",
    "parameters",
    "size_log",
    "dtype_bytes",
    "context_length",
    "license",
    "quality",
    "popularity_score",
    "updated_days",
    "language_bits",
    "task_bits",
)
#: The ``c.<column>`` contract of filters and third-party ``rank_sql`` expressions: the columns
#: of every selection table (``cards``, ``card_tasks``, ``card_metrics``, each read as ``c``) and
#: what each means, so any requirement can be ranked with them.
RANK_COLUMNS: dict[str, str] = {
    "id": "the card's row id (catalog order)",
    "source": "the source's name",
    "listed": "1 while the source lists the card, else 0",
    "parameters": "parameter count (NULL when unknown)",
    "size_log": "log10 of the parameter count (NULL when unknown)",
    "dtype_bytes": "bytes per weight of the card's dtype (NULL when unknown)",
    "context_length": "context length in tokens (NULL when unknown)",
    "license": "license id, lower case (NULL when unknown)",
    "quality": "mean normalized (0-1) higher-is-better reported metric (NULL: none)",
    "popularity_score": "log10(1 + downloads) / 7, capped at 1",
    "updated_days": "days since 1970 of the last update (NULL when unknown)",
    "language_bits": "a bit per language (internal: languages are filtered, not ranked, here)",
}
#: Bumped when a column of RANK_COLUMNS is removed or changes meaning; adding one keeps it. A
#: plugin can check it (``assert RANK_COLUMNS_VERSION == 1``) to fail loudly instead of ranking
#: wrongly.
RANK_COLUMNS_VERSION = 1
