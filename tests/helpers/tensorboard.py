"""What TensorBoard shows, read by TensorBoard's own code: a run folder's tags through its event reader, and the
HParams table through the HParams plugin's HTTP routes (what its web page posts), served in this process."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EVERYTHING = {"images": 0, "scalars": 0, "tensors": 0}  # keep every event of each kind (not a sample)


def events(run: Path) -> EventAccumulator:
    """Every event of a run folder (all its event files), loaded."""
    accumulator = EventAccumulator(str(run), size_guidance=EVERYTHING)
    accumulator.Reload()
    return accumulator


def text(accumulator: EventAccumulator, tag: str) -> str:
    """The last text written under `tag` (`SummaryWriter.add_text`)."""
    from tensorboard.util import tensor_util

    value = tensor_util.make_ndarray(accumulator.Tensors(f"{tag}/text_summary")[-1].tensor_proto)
    return str(value.item().decode())


def hparams_api(logdir: Path, route: str, request: dict[str, Any]) -> dict[str, Any]:
    """POST `request` to the HParams plugin's `route` (`experiment`, `session_groups`) over `logdir`."""
    with warnings.catch_warnings():  # TensorBoard's vendored html5lib warns of its own deprecation at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from tensorboard.backend import application
        from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
        from tensorboard.plugins import base_plugin
        from tensorboard.plugins.hparams import hparams_plugin
    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
    app = application.TensorBoardWSGI([hparams_plugin.HParamsPlugin(context)])
    response = Client(app, Response).post(
        f"/data/plugin/hparams/{route}", data=json.dumps(request), content_type="application/json"
    )
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    result: dict[str, Any] = json.loads(response.get_data(as_text=True))
    return result


def sessions_by(logdir: Path, metric: str) -> list[dict[str, Any]]:
    """The HParams table's rows, sorted by `metric` (highest first) as TensorBoard sorts them: each with its `name`,
    `hparams` and `metrics` ({tag: value})."""
    request = {
        "startIndex": 0,
        "sliceSize": 1000,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"metric": {"tag": metric}, "order": "ORDER_DESC"}],
    }
    groups = hparams_api(logdir, "session_groups", request)["sessionGroups"]
    return [
        {
            "name": group["name"],
            "hparams": group["hparams"],
            "metrics": {m["name"]["tag"]: m["value"] for m in group["metricValues"]},
            "status": group["sessions"][0].get("status", "STATUS_UNKNOWN"),
        }
        for group in groups
    ]
