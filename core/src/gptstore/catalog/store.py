"""The catalog: model cards in SQLite (WAL), searchable and filterable at a million cards.

Writes run in one ``BEGIN IMMEDIATE`` transaction; reads that take several statements run in one
read transaction, so a reader sees the catalog before or after a sync, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attrs import evolve, frozen

from gptstore.catalog.filters import fts_query, fts_text, sql_filters
from gptstore.catalog.schema import CARD_COLUMNS, MIGRATIONS, SCHEMA_VERSION
from gptstore.converter import converter
from gptstore.errors import CatalogError, NotFound
from gptstore.protocols import SqlRanking
from gptstore.scoring import epoch_days, popularity_score, size_log
from gptstore.types import ModelCard, Requirement


@frozen
class Entry:
    """A card as the catalog holds it: whether its source still lists it, and when seen."""

    card: ModelCard
    listed: bool
    synced_at: str
    id: int


@frozen
class SourceSync:
    """What one source's sync changed."""

    source: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    delisted: int = 0
    refused: tuple[tuple[str, str], ...] = ()
    error: str | None = None
    #: Set when the source said it was offline: what it listed was added or updated, and
    #: nothing was delisted (it may only see part of what it offers).
    offline: str | None = None


#: Bits 0..61 of task_bits / language_bits are handed out; SQLite integers are signed 64-bit.
MAX_BITS = 62


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements (executescript would commit our transaction)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip():
        raise CatalogError(f"unterminated statement in a migration: {buffer.strip()[:60]}")


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


#: Bump when the derived columns change meaning (normalization of metrics, popularity or size
#: scales, dtype sizes): every card's fingerprint changes, so the next sync recomputes them all.
DERIVATION_VERSION = "1"


def _fingerprint(document: str) -> str:
    return hashlib.sha256(f"{DERIVATION_VERSION}\n{document}".encode()).hexdigest()[:32]


def _document(card: ModelCard) -> str:
    return json.dumps(converter.unstructure(card), sort_keys=True, separators=(",", ":"))


class Catalog:
    """A catalog file. Connections are per thread; the object may be shared between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.migrate()

    # -- connections and transactions ----------------------------------------------------------

    @property
    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA cache_size = -65536")
            except sqlite3.DatabaseError as exc:
                raise CatalogError(
                    f"cannot open catalog {self.path}: {exc}; move the file "
                    "away and run `gptstore sync` to rebuild it"
                ) from None
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        conn = self.connection
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One snapshot for several statements (nested calls share the outer one)."""
        conn = self.connection
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    # -- schema ----------------------------------------------------------------------------------

    def schema_version(self) -> int:
        return int(self.connection.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Bring the schema up to date. Opening an up-to-date catalog takes no write lock, so
        readers never wait for a sync in progress."""
        try:
            if self.schema_version() == SCHEMA_VERSION:
                return
            with self.write() as conn:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise CatalogError(
                        f"catalog {self.path} has schema version {version}, newer than this "
                        f"gptstore knows ({SCHEMA_VERSION}); upgrade gptstore"
                    )
                for number in range(version, SCHEMA_VERSION):
                    for statement in _statements(MIGRATIONS[number]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number + 1}")
        except sqlite3.DatabaseError as exc:
            raise CatalogError(
                f"cannot open catalog {self.path}: {exc}; move the file away and "
                "run `gptstore sync` to rebuild it"
            ) from None

    # -- writing ---------------------------------------------------------------------------------

    def bits(self) -> dict[tuple[str, str], int]:
        """The vocabulary: (kind, value) -> bit of the task_bits / language_bits columns."""
        return {
            (kind, value): bit
            for kind, value, bit in self.connection.execute(
                "SELECT kind, value, bit FROM vocabulary"
            )
        }

    @staticmethod
    def _mask(
        conn: sqlite3.Connection,
        bits: dict[tuple[str, str], int],
        kind: str,
        values: tuple[str, ...],
    ) -> int:
        mask = 0
        for value in values:
            if (kind, value) not in bits:
                used = sum(1 for k, _v in bits if k == kind)
                if used >= MAX_BITS:
                    continue  # filtered through card_tasks / card_languages instead
                bits[kind, value] = used
                conn.execute(
                    "INSERT INTO vocabulary (kind, value, bit) VALUES (?, ?, ?)",
                    (kind, value, used),
                )
            mask |= 1 << bits[kind, value]
        return mask

    def _insert(
        self,
        conn: sqlite3.Connection,
        card: ModelCard,
        document: str,
        fingerprint: str,
        now: str,
        card_id: int | None,
        bits: dict[tuple[str, str], int],
    ) -> None:
        selection = (
            card.source,
            card.parameters,
            size_log(card.parameters),
            card.dtype_bytes,
            card.context_length,
            card.license,
            card.quality,
            popularity_score(card.popularity),
            epoch_days(card.updated_at or card.created_at),
            self._mask(conn, bits, "language", card.languages),
            self._mask(conn, bits, "task", card.tasks),
        )
        columns = ", ".join(CARD_COLUMNS)
        marks = ", ".join("?" * len(CARD_COLUMNS))
        if card_id is None:
            card_id = conn.execute(
                f"INSERT INTO cards ({columns}, listed) VALUES ({marks}, 1)", selection
            ).lastrowid
        else:
            assignments = ", ".join(f"{name} = ?" for name in CARD_COLUMNS)
            conn.execute(
                f"UPDATE cards SET {assignments}, listed = 1 WHERE id = ?", (*selection, card_id)
            )
            for table in ("card_tasks", "card_metrics", "card_measured"):
                conn.execute(f"DELETE FROM {table} WHERE id = ?", (card_id,))
            conn.execute("DELETE FROM card_languages WHERE card_id = ?", (card_id,))
            conn.execute("DELETE FROM cards_fts WHERE rowid = ?", (card_id,))
        conn.execute(
            "INSERT OR REPLACE INTO card_docs (card_id, uid, model_id, fingerprint, "
            "synced_at, delisted_at, card) VALUES (?, ?, ?, ?, ?, NULL, ?)",
            (card_id, card.uid, card.model_id, fingerprint, now, document),
        )
        # card_tasks has no task_bits: its rows are already one task each.
        conn.executemany(
            f"INSERT INTO card_tasks (task, id, listed, {', '.join(CARD_COLUMNS[:-1])}) "
            f"VALUES (?, ?, 1, {', '.join('?' * (len(CARD_COLUMNS) - 1))})",
            [(task, card_id, *selection[:-1]) for task in card.tasks],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO card_languages (language, card_id) VALUES (?, ?)",
            [(lang, card_id) for lang in card.languages],
        )
        metrics = {m.name: m.normalized for m in card.metrics if m.normalized is not None}
        conn.executemany(
            f"INSERT INTO card_metrics (name, id, value, listed, {columns}) "
            f"VALUES (?, ?, ?, 1, {marks})",
            [(name, card_id, value, *selection) for name, value in metrics.items()],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO card_measured (name, id, value) VALUES (?, ?, ?)",
            [
                (m.name, card_id, m.value)
                for m in card.metrics
                if m.origin == "measured" and math.isfinite(m.value)
            ],
        )
        conn.execute(
            "INSERT INTO cards_fts (rowid, name, description, tags) VALUES (?,?,?,?)",
            (card_id, *map(fts_text, (card.name, card.description, " ".join(card.tags)))),
        )

    def replace_source(
        self,
        conn: sqlite3.Connection,
        source: str,
        cards: Iterable[ModelCard],
        *,
        delist: bool = True,
    ) -> SourceSync:
        """Upsert ``cards`` as everything ``source`` lists now; mark the rest delisted (unless
        ``delist`` is False: a partial listing, such as an offline source's).

        Runs inside the caller's write transaction.
        """
        now = datetime.now(UTC).isoformat()
        existing = {
            uid: (card_id, fp, listed)
            for uid, card_id, fp, listed in conn.execute(
                "SELECT d.uid, c.id, d.fingerprint, c.listed FROM cards c "
                "JOIN card_docs d ON d.card_id = c.id WHERE c.source = ?",
                (source,),
            )
        }
        added = updated = unchanged = 0
        seen: set[str] = set()
        bits = self.bits()
        for card in cards:
            if card.source != source:
                raise CatalogError(
                    f"source {source!r} produced a card of source {card.source!r} "
                    f"({card.model_id}); a source must set source={source!r}"
                )
            if card.uid in seen:
                continue
            seen.add(card.uid)
            document = _document(card)
            fingerprint = _fingerprint(document)
            previous = existing.get(card.uid)
            if previous is None:
                self._insert(conn, card, document, fingerprint, now, None, bits)
                added += 1
            elif previous[1] != fingerprint or not previous[2]:
                self._insert(conn, card, document, fingerprint, now, previous[0], bits)
                updated += 1
            else:
                conn.execute(
                    "UPDATE card_docs SET synced_at = ? WHERE card_id = ?", (now, previous[0])
                )
                unchanged += 1
        gone = [
            card_id
            for uid, (card_id, _fp, listed) in existing.items()
            if uid not in seen and listed and delist
        ]
        conn.executemany("UPDATE cards SET listed = 0 WHERE id = ?", [(i,) for i in gone])
        for table in ("card_tasks", "card_metrics"):
            conn.executemany(f"UPDATE {table} SET listed = 0 WHERE id = ?", [(i,) for i in gone])
        conn.executemany(
            "UPDATE card_docs SET delisted_at = ? WHERE card_id = ?", [(now, i) for i in gone]
        )
        return SourceSync(source, added, updated, unchanged, len(gone))

    def record_sync(self, conn: sqlite3.Connection, result: SourceSync, started: str) -> None:
        conn.execute(
            "INSERT INTO sync_runs (source, started_at, finished_at, added, updated, unchanged, "
            "delisted, refused, error) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                result.source,
                started,
                datetime.now(UTC).isoformat(),
                result.added,
                result.updated,
                result.unchanged,
                result.delisted,
                len(result.refused),
                result.error,
            ),
        )

    def upsert(self, cards: Sequence[ModelCard], source: str) -> SourceSync:
        """Replace what the catalog holds for ``source`` with ``cards``, atomically."""
        started = datetime.now(UTC).isoformat()
        with self.write() as conn:
            result = self.replace_source(conn, source, cards)
            self.record_sync(conn, result, started)
        return result

    # -- reading ---------------------------------------------------------------------------------

    def _entries(self, conn: sqlite3.Connection, ids: Sequence[int]) -> list[Entry]:
        if not ids:
            return []
        rows: dict[int, tuple[str, int, str]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for card_id, document, listed, synced in conn.execute(
                f"SELECT d.card_id, d.card, c.listed, d.synced_at FROM card_docs d "
                f"JOIN cards c ON c.id = d.card_id WHERE d.card_id IN ({marks})",
                chunk,
            ):
                rows[card_id] = (document, listed, synced)
        return [
            Entry(
                converter.structure(json.loads(rows[i][0]), ModelCard),
                bool(rows[i][1]),
                rows[i][2],
                i,
            )
            for i in ids
            if i in rows
        ]

    def entries(self, ids: Sequence[int]) -> list[Entry]:
        with self.read() as conn:
            return self._entries(conn, ids)

    def count(self, *, listed_only: bool = False) -> int:
        where = " WHERE listed = 1" if listed_only else ""
        return int(self.connection.execute(f"SELECT count(*) FROM cards{where}").fetchone()[0])

    def resolve(self, name: str) -> Entry:
        """A card by uid (``local:foo``) or by model id when only one source has it."""
        with self.read() as conn:
            rows = conn.execute(
                "SELECT card_id, uid FROM card_docs WHERE uid = ?", (name,)
            ).fetchall()
            if not rows:
                rows = conn.execute(
                    "SELECT card_id, uid FROM card_docs WHERE model_id = ? ORDER BY uid", (name,)
                ).fetchall()
            if not rows:
                like = conn.execute(
                    "SELECT uid FROM card_docs WHERE uid LIKE ? ESCAPE '\\' ORDER BY uid LIMIT 5",
                    (f"%{_escape_like(name)}%",),
                ).fetchall()
                hint = (
                    f"; did you mean {', '.join(r[0] for r in like)}?"
                    if like
                    else "; `gptstore search` lists the catalog, `gptstore sync` refreshes it"
                )
                raise NotFound(f"no model {name!r} in the catalog{hint}")
            if len(rows) > 1:
                raise NotFound(
                    f"{name!r} is ambiguous: {', '.join(r[1] for r in rows)}; "
                    "write it as SOURCE:MODEL_ID"
                )
            return self._entries(conn, [rows[0][0]])[0]

    def search(self, requirement: Requirement, *, limit: int = 20) -> tuple[list[Entry], int]:
        """Cards meeting ``requirement``: by text relevance when it has a query, else by
        popularity; and how many match in all."""
        bits = self.bits()
        with self.read() as conn:
            if requirement.query:
                # Driven by the text matches: FTS5 finds them, each is checked against the
                # filters by rowid, and the survivors are ranked and counted in one pass.
                hits, params = _hits(requirement, bits, "c.id AS id, bm25(cards_fts) AS rank")
                rows = conn.execute(
                    f"WITH hits AS MATERIALIZED ({hits}) "
                    "SELECT (SELECT count(*) FROM hits), id FROM hits ORDER BY rank, id LIMIT ?",
                    [*params, limit],
                ).fetchall()
                total = rows[0][0] if rows else 0
                ids = [row[1] for row in rows]
            else:
                table, clauses, params = sql_filters(requirement, bits)
                where = " AND ".join(clauses) or "1"
                ids = [
                    row[0]
                    for row in conn.execute(
                        f"SELECT c.id FROM {table} WHERE {where} "
                        "ORDER BY c.popularity_score DESC, c.id LIMIT ?",
                        [*params, limit],
                    )
                ]
                (total,) = conn.execute(
                    f"SELECT count(*) FROM {table} WHERE {where}", params
                ).fetchone()
            return self._entries(conn, ids), int(total)

    def facets(
        self, requirement: Requirement, *, most: int = 20
    ) -> dict[str, list[tuple[str, int]]]:
        """How many cards meeting ``requirement`` there are per source, task and license (the
        ``most`` commonest values of each), for filters that show their counts."""
        hits, params = _hits(requirement, self.bits())
        with self.read() as conn:
            columns = {
                "source": ("cards x", "x.source"),
                "license": ("cards x", "coalesce(x.license, '?')"),
                "task": ("card_tasks x", "x.task"),
            }
            facets: dict[str, list[tuple[str, int]]] = {}
            for name, (table_of, column) in columns.items():
                rows = conn.execute(
                    f"WITH hits AS MATERIALIZED ({hits}) SELECT {column}, count(*) FROM hits "
                    f"JOIN {table_of} ON x.id = hits.id GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?",
                    [*params, most],
                ).fetchall()
                facets[name] = [(str(value), int(count)) for value, count in rows]
            return facets

    def ranked_ids(
        self, requirement: Requirement, ranking: SqlRanking, limit: int
    ) -> tuple[list[int], int]:
        """The ids of the best ``limit`` cards meeting ``requirement`` by ``ranking`` (ties:
        fewer parameters, then catalog order), and how many meet it."""
        with self.read() as conn:
            table, clauses, params = sql_filters(requirement, self.bits())
            where = " AND ".join(clauses) or "1"
            (matched,) = conn.execute(
                f"SELECT count(*) FROM {table} WHERE {where}", params
            ).fetchone()
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT c.id, {ranking.expression} AS score FROM {table} WHERE {where} "
                    "ORDER BY score DESC, c.parameters IS NULL, c.parameters, c.id LIMIT ?",
                    [*ranking.params, *params, limit],
                )
            ]
        return ids, int(matched)

    def matching_ids(self, requirement: Requirement) -> list[int]:
        """The ids of every card meeting ``requirement``, in catalog order."""
        with self.read() as conn:
            table, clauses, params = sql_filters(requirement, self.bits())
            where = " AND ".join(clauses) or "1"
            return [
                row[0] for row in conn.execute(f"SELECT c.id FROM {table} WHERE {where}", params)
            ]

    def failing_ids(self, requirement: Requirement, limit: int) -> list[int]:
        """The ids of the first ``limit`` cards (catalog order) that fail ``requirement``."""
        with self.read() as conn:
            _cards, clauses, params = sql_filters(requirement, self.bits(), fast=False)
            where = " AND ".join(clauses) or "1"
            return [
                row[0]
                for row in conn.execute(
                    f"SELECT c.id FROM cards c WHERE NOT coalesce(({where}), 0) "
                    "ORDER BY c.id LIMIT ?",
                    [*params, limit],
                )
            ]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query (tests and benchmarks look inside with it)."""
        return self.connection.execute(sql, params).fetchall()


def _hits(
    requirement: Requirement, bits: dict[tuple[str, str], int], columns: str = "c.id AS id"
) -> tuple[str, list[Any]]:
    """A SELECT of ``columns`` over the cards (``c``) meeting ``requirement``, and its
    parameters: driven by the full-text index when it has words, else by the filters' index."""
    if requirement.query:
        _cards, clauses, params = sql_filters(evolve(requirement, query=None), bits, fast=False)
        where = " AND ".join(["cards_fts MATCH ?", *clauses])
        return (
            f"SELECT {columns} FROM cards_fts CROSS JOIN cards c ON c.id = cards_fts.rowid "
            f"WHERE {where}",
            [fts_query(requirement.query), *params],
        )
    table, clauses, params = sql_filters(requirement, bits)
    return f"SELECT {columns} FROM {table} WHERE {' AND '.join(clauses) or '1'}", list(params)
