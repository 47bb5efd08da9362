"""The ``hf`` model source: the Hugging Face hub, or its local cache when the hub is out of reach.

Reaching the hub fails fast: before any hub call the source asks the hub for one model with a
timeout (5 s by default) in a thread of its own, so a missing network costs seconds, never
huggingface_hub's or transformers' minutes of retries. With ``HF_HUB_OFFLINE=1``, or when that
probe fails, the source lists and fetches from the local HF cache and says it is offline.
Nothing here ever runs with ``trust_remote_code``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from attrs import field, frozen

from gptstore.plugin import (
    PICKLE_SUFFIXES,
    GptstoreError,
    InvalidInput,
    ModelCard,
    NotFound,
    Refusal,
    RefusedModel,
    SearchQuery,
    SourceStatus,
    context_length,
    matching,
    parse_count,
    read_card,
    str_tuple,
    weight_files,
)
from gptstore_hf.cards import SOURCE, model_info_to_card

DEFAULT_ENDPOINT = "https://huggingface.co"
#: What a listing asks the hub to include for each model (one request per page).
EXPAND = [
    "cardData",
    "safetensors",
    "config",
    "downloads",
    "likes",
    "createdAt",
    "lastModified",
    "pipeline_tag",
    "tags",
    "sha",
    "gated",
    "library_name",
]
#: The files a fetch downloads: config, tokenizer, generation config, chat template, README and
#: safetensors weights. Pickle weights are never downloaded.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
    "*.safetensors",
    "model.safetensors.index.json",
]
_ORDER: dict[str, Callable[[ModelCard], Any]] = {
    "downloads": lambda c: -c.popularity,
    "likes": lambda c: -c.likes,
    "trending": lambda c: 0,  # the hub's trending score is not on the card: keep hub order
    "last_modified": lambda c: -(c.updated_at.timestamp() if c.updated_at else 0),
}
_SORTS = {
    "downloads": "downloads",
    "likes": "likes",
    "trending": "trendingScore",
    "last_modified": "last_modified",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
#: With a parameter range, a search reads up to this many times its limit to find matches
#: (the hub API of huggingface_hub<1.0 takes no parameter range).
RANGE_OVERSCAN = 10


@frozen(kw_only=True)
class HubSearch:
    """One search that ``gptstore sync`` runs against the hub (``[[sources.hf.searches]]``).

    :param min_params: / max_params: a parameter range such as ``"2B"`` (models without a
        safetensors parameter count are left out when a range is set).
    :param licenses: any of these licenses (one hub request per license).
    :param limit: most models this search adds; pagination stops there.
    """

    text: str | None = None
    task: str | None = "text-generation"
    library: str | None = None
    author: str | None = None
    language: str | None = None
    licenses: tuple[str, ...] = field(default=(), converter=str_tuple)
    min_params: str | None = None
    max_params: str | None = None
    sort: Literal["downloads", "likes", "trending", "last_modified"] = "downloads"
    limit: int = 100

    def __attrs_post_init__(self) -> None:
        if self.limit <= 0:
            raise InvalidInput("hub search", [f"limit must be positive, got {self.limit}"])
        for bound in (self.min_params, self.max_params):
            if bound is not None:
                parse_count(bound, "hub search parameter bound")


@frozen(kw_only=True)
class HubOptions:
    """``[sources.hf]`` in config.toml.

    :param searches: what sync lists; by default the 100 most downloaded text-generation models.
    :param endpoint: the hub (``HF_ENDPOINT`` when unset).
    :param cache_dir: the HF cache (``HF_HUB_CACHE`` / ``~/.cache/huggingface/hub`` when unset).
    :param timeout: seconds to wait for the hub before working offline.
    """

    searches: tuple[HubSearch, ...] = (HubSearch(),)
    endpoint: str | None = None
    cache_dir: str | None = None
    timeout: float = 5.0


_configured_timeout: float | None = None


def _use_timeout(seconds: float) -> None:
    """Give every huggingface_hub request a default timeout (it sets none for most calls)."""
    global _configured_timeout
    if _configured_timeout == seconds:
        return
    from huggingface_hub import configure_http_backend
    from huggingface_hub.utils._http import UniqueRequestIdAdapter

    class TimeoutAdapter(UniqueRequestIdAdapter):  # type: ignore[misc]
        def send(self, request: Any, **kwargs: Any) -> Any:
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = seconds
            return super().send(request, **kwargs)

    def factory() -> Any:
        import requests

        session = requests.Session()
        session.mount("http://", TimeoutAdapter())
        session.mount("https://", TimeoutAdapter())
        return session

    configure_http_backend(backend_factory=factory)
    _configured_timeout = seconds


def _within(seconds: float, what: str, produce: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """Items of ``produce()``, each within ``seconds`` of the last: huggingface_hub retries a
    failing page for minutes (http_backoff); a worker thread keeps that from blocking us."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def work() -> None:
        try:
            for item in produce():
                items.put(("item", item))
            items.put(("end", None))
        except BaseException as exc:
            items.put(("error", exc))

    threading.Thread(target=work, daemon=True).start()
    while True:
        try:
            kind, value = items.get(timeout=seconds)
        except queue.Empty:
            raise GptstoreError(
                f"{what}: the hub stopped answering (nothing for "
                f"{seconds:g} s); try again, or work offline with "
                "HF_HUB_OFFLINE=1"
            ) from None
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value


def _offline_by_env() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise InvalidInput(
            "repository id", [f"{repo_id!r} is not a hub repository id (owner/name)"]
        )
    return repo_id


class HubSource:
    """Lists hub models through ``HfApi.list_models`` and fetches them pinned to a revision."""

    def __init__(self, options: HubOptions | None) -> None:
        from huggingface_hub import constants

        options = options or HubOptions()
        self.options = options
        self.endpoint = (options.endpoint or constants.ENDPOINT or DEFAULT_ENDPOINT).rstrip("/")
        self.cache_dir = Path(options.cache_dir or constants.HF_HUB_CACHE).expanduser()
        self._offline_reason: str | Literal[False] | None = False  # False: not probed yet

    # -- reaching the hub ------------------------------------------------------------------------

    def offline_reason(self) -> str | None:
        """Why the hub cannot be used now (None when it can); probed once per source."""
        if self._offline_reason is not False:
            return self._offline_reason
        if _offline_by_env():
            self._offline_reason = "HF_HUB_OFFLINE is set"
            return self._offline_reason
        silent = f"no answer from {self.endpoint} within {self.options.timeout:g} s"
        outcome: list[str | None] = []

        def probe() -> None:
            import requests

            try:
                response = requests.get(
                    f"{self.endpoint}/api/models", params={"limit": 1}, timeout=self.options.timeout
                )
                # A proxy's or captive portal's page is not the hub: expect a JSON list.
                answer = response.json() if response.status_code == 200 else None
                outcome.append(
                    None
                    if isinstance(answer, list)
                    else f"{self.endpoint} answered HTTP {response.status_code} without "
                    "a model list (a proxy or login page?)"
                )
            except ValueError:
                outcome.append(f"{self.endpoint} answered something other than JSON")
            except requests.Timeout:
                outcome.append(silent)
            except requests.RequestException as exc:
                text = str(exc).lower()
                detail = (
                    "its host name does not resolve"
                    if "resol" in text
                    else "connection refused"
                    if "refused" in text
                    else f"{type(exc).__name__}: {str(exc)[:120]}"
                )
                outcome.append(f"{self.endpoint} unreachable: {detail}")

        # A thread bounds the whole probe, DNS resolution included (requests' timeout does not).
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(self.options.timeout + 0.5)
        self._offline_reason = outcome[0] if outcome else silent
        return self._offline_reason

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint)  # token: HF_TOKEN or the saved login

    def _hub_error(self, exc: Exception, repo_id: str | None = None) -> GptstoreError:
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        what = f"repository {repo_id}" if repo_id else "the hub listing"
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, GatedRepoError) or status in (401, 403):
            return GptstoreError(
                f"{what}: access denied (HTTP {status}); if it is gated or private, accept its "
                "terms on the hub, then set HF_TOKEN or run `huggingface-cli login`"
            )
        if isinstance(exc, RepositoryNotFoundError) or status == 404:
            return NotFound(f"{what} not found on {self.endpoint} (or private without a token)")
        if isinstance(exc, HfHubHTTPError):
            return GptstoreError(f"{what}: the hub answered HTTP {status}: {exc}")
        return GptstoreError(f"{what}: {type(exc).__name__}: {exc}")

    # -- listing ---------------------------------------------------------------------------------

    def search(self, query: SearchQuery) -> Iterator[ModelCard | Refusal]:
        if self.offline_reason() is not None:
            yield from self._search_cache(query)
            return
        if query == SearchQuery():
            searches = self.options.searches
        else:
            searches = (HubSearch(text=query.text, task=query.task, limit=query.limit or 50),)
        seen: set[str] = set()
        for search in searches:
            for card in self._run(search):
                if card.model_id not in seen:
                    seen.add(card.model_id)
                    yield card

    def _run(self, search: HubSearch) -> Iterator[ModelCard]:
        """One configured search: one hub listing per license, merged in the search's order,
        at most ``limit`` cards."""
        from huggingface_hub.errors import HfHubHTTPError

        low = parse_count(search.min_params) if search.min_params else None
        high = parse_count(search.max_params) if search.max_params else None
        ranged = low is not None or high is not None
        per_listing = search.limit * (RANGE_OVERSCAN if ranged else 1)
        found: list[ModelCard] = []
        for license_name in search.licenses or (None,):

            def listing(license_name: str | None = license_name) -> Iterable[Any]:
                models: Iterable[Any] = self._api().list_models(
                    search=search.text,
                    pipeline_tag=search.task,
                    library=search.library,
                    author=search.author,
                    language=search.language,
                    filter=f"license:{license_name}" if license_name else None,
                    sort=_SORTS[search.sort],
                    limit=per_listing,
                    expand=EXPAND,
                )
                return models

            kept = 0
            try:
                for info in _within(self.options.timeout * 3, "hub listing", listing):
                    card = model_info_to_card(info, self.endpoint, self._cached_context(info))
                    p = card.parameters
                    if ranged and (p is None or (low and p < low) or (high and p > high)):
                        continue
                    found.append(card)
                    kept += 1
                    if kept >= search.limit:
                        break
            except (HfHubHTTPError, OSError) as exc:
                raise self._hub_error(exc) from None
        if len(search.licenses) > 1:
            found.sort(key=_ORDER[search.sort])
        yield from found[: search.limit]

    def _cached_context(self, info: Any) -> int | None:
        """The context length from the HF cache's config.json of that revision, when cached."""
        config = (
            self.cache_dir
            / f"models--{info.id.replace('/', '--')}"
            / "snapshots"
            / str(info.sha)
            / "config.json"
        )
        try:
            return context_length(json.loads(config.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            return None

    def _search_cache(self, query: SearchQuery) -> Iterator[ModelCard | Refusal]:
        return matching(self._scan_cache(), query)

    def _scan_cache(self) -> Iterator[ModelCard | Refusal]:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            cache = scan_cache_dir(self.cache_dir)
        except CacheNotFound:
            return
        for repo in sorted(cache.repos, key=lambda r: r.repo_id):
            if repo.repo_type != "model":
                continue
            revision = _current_revision(repo)
            if revision is None:
                continue
            try:
                card = read_card(Path(revision.snapshot_path), repo.repo_id, source=SOURCE)
            except (RefusedModel, InvalidInput) as exc:
                yield Refusal(repo.repo_id, str(exc))
                continue
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                yield Refusal(repo.repo_id, f"unreadable in the HF cache: {exc}")
                continue
            yield _with(
                card, revision=revision.commit_hash, location=f"{self.endpoint}/{repo.repo_id}"
            )

    # -- fetching --------------------------------------------------------------------------------

    def fetch(self, model_id: str, revision: str | None, dest: Path) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        repo_id = check_repo_id(model_id)
        if revision is not None and not _COMMIT.match(revision):
            raise InvalidInput(
                "revision",
                [
                    f"{revision!r} is not a commit SHA (40 hex digits); "
                    "gptstore pins hub models to the synced commit"
                ],
            )
        reason = self.offline_reason()
        patterns = ALLOW_PATTERNS if reason else self._remote_patterns(repo_id, revision)

        def download() -> list[str]:
            return [
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=self.cache_dir,
                    allow_patterns=patterns,
                    local_files_only=reason is not None,
                    etag_timeout=self.options.timeout,
                    endpoint=self.endpoint,
                )
            ]

        try:
            # Each download request has the timeout; the deadline bounds retries between them.
            [folder] = _within(
                max(60.0, self.options.timeout * 12), f"download of {repo_id}", download
            )
        except LocalEntryNotFoundError as exc:
            why = f"the hub is out of reach ({reason})" if reason else f"{exc}"
            raise NotFound(
                f"{repo_id}@{revision or 'main'} is not in the HF cache "
                f"({self.cache_dir}) and cannot be downloaded: {why}"
            ) from None
        except (HfHubHTTPError, OSError) as exc:
            raise self._hub_error(exc, repo_id) from None
        snapshot = Path(folder)
        target = dest / repo_id.replace("/", "--")
        if target.exists():
            raise GptstoreError(f"cannot fetch {repo_id}: {target} already exists")
        # Only the allowed top-level files: a cached snapshot may hold more (remote code,
        # other formats, files of another fetch).
        present = [p.name for p in sorted(snapshot.iterdir()) if p.is_file()]
        refuse_without_safetensors(repo_id, present)
        names = [n for n in present if any(fnmatch.fnmatch(n, p) for p in patterns)]
        check_config(snapshot, repo_id)
        target.mkdir(parents=True)
        for name in names:
            shutil.copyfile(snapshot / name, target / name)  # follows the cache's blob links
        weight_files(target)  # every shard the index lists must be there
        return target

    def _remote_patterns(self, repo_id: str, revision: str | None) -> list[str]:
        """The exact top-level files to download: allowed names, and only the weights that the
        safetensors index names (or every top-level safetensors file without an index)."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            [info] = _within(
                self.options.timeout * 3,
                f"repository {repo_id}",
                lambda: [
                    self._api().model_info(repo_id, revision=revision, timeout=self.options.timeout)
                ],
            )
        except (HfHubHTTPError, OSError) as exc:
            raise self._hub_error(exc, repo_id) from None
        names = [s.rfilename for s in info.siblings or [] if "/" not in s.rfilename]
        refuse_without_safetensors(repo_id, names)
        weights = [n for n in names if n.endswith(".safetensors")]
        if "model.safetensors.index.json" in names:
            weights = [n for n in weights if n.startswith("model-")] or weights
        others = [
            n
            for n in names
            if not n.endswith(".safetensors") and any(fnmatch.fnmatch(n, p) for p in ALLOW_PATTERNS)
        ]
        return others + weights

    def status(self) -> SourceStatus:
        reason = self.offline_reason()
        if reason is None:
            return SourceStatus(True, f"online: {self.endpoint}")
        return SourceStatus(
            False, f"offline ({reason}); listing and fetching from the HF cache {self.cache_dir}"
        )


def _with(card: ModelCard, **changes: Any) -> ModelCard:
    from attrs import evolve

    return evolve(card, **changes)


def _current_revision(repo: Any) -> Any:
    """The cached revision that ``main`` points to, else the most recently modified one."""
    for revision in repo.revisions:
        if "main" in revision.refs:
            return revision
    return max(repo.revisions, key=lambda r: r.last_modified, default=None)


def refuse_without_safetensors(repo_id: str, names: list[str]) -> None:
    """RefusedModel when a repository offers no safetensors weights."""
    if any(name.endswith(".safetensors") for name in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise RefusedModel(
            f"{repo_id}: only pickle weights ({', '.join(pickles[:3])}); gptstore loads "
            "safetensors only, because unpickling can run arbitrary code. Look for a "
            "safetensors revision or conversion of this model."
        )
    raise RefusedModel(f"{repo_id}: no *.safetensors weights in the repository")


def check_config(folder: Path, repo_id: str) -> None:
    """Refuse a model whose architecture transformers does not know (it would need remote code,
    which gptstore never runs)."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RefusedModel(f"{repo_id}: no readable config.json ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in CONFIG_MAPPING:
        hint = " and asks for remote code" if config.get("auto_map") else ""
        raise RefusedModel(
            f"{repo_id}: architecture {model_type!r} is unknown to the installed transformers"
            f"{hint}; gptstore never runs trust_remote_code. Upgrade transformers if it is newer."
        )
