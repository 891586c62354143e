"""``pacs-xai viewer``: the results in a real web viewer (OHIF on Orthanc), on 127.0.0.1.

The stack, every part a plain process or thread on loopback ports:

- Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) as the PACS, with DICOMweb;
- the pacs-xai node with the demo model, allowed to be called by that Orthanc and routing every
  result kind back into it;
- nginx (Debian ``nginx``) with its own config in a temp folder, serving the OHIF build (npm
  package ``@ohif/app``, pinned, fetched into a cache folder when missing, never committed) with
  the project's ``app-config.js`` (beside this module), and proxying ``/dicom-web/`` and ``/wado`` to
  Orthanc (one origin, so no CORS).

The demo phantom studies are uploaded to Orthanc, routed by Orthanc to the node (C-STORE), and
for every study whose results are back the OHIF links are printed. ``ViewerStack`` is also what
the browser test (``tests/viewer/``) runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dicom_io.net.network import free_port
from service.node.app import Node
from service.node.config import load_config
from service.synthetic.phantoms import write_phantom_studies
from service.tools.orthanc import OrthancError, OrthancProcess, stop_process, wait_http

#: The OHIF release served; its built app ships in the npm package ``@ohif/app``.
OHIF_VERSION = "3.13.2"
OHIF_PACKAGE = f"@ohif/app@{OHIF_VERSION}"
#: OHIF's configuration for this stack (package data beside this module).
APP_CONFIG = Path(__file__).resolve().with_name("app-config.js")
ALL_OUTPUTS = ("sc", "pm", "seg_binary", "seg_fractional", "sr")

SOP_KIND = {
    "1.2.840.10008.5.1.4.1.1.7": "sc",
    "1.2.840.10008.5.1.4.1.1.30": "pm",
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    "1.2.840.10008.5.1.4.1.1.88.33": "sr",
    "1.2.840.10008.5.1.4.1.1.88.22": "sr",
}
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


class ViewerError(OrthancError):
    """A part of the stack is missing or did not start; the message says which and what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("PACS_XAI_CACHE", Path.home() / ".cache" / "pacs-xai"))


def ensure_ohif(cache_dir: Path | None = None) -> Path:
    """The OHIF ``dist/`` folder, fetched with ``npm pack`` (pinned version) when missing."""
    root = (cache_dir or default_cache_dir()) / "ohif" / OHIF_VERSION
    dist = root / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerError(f"npm is not installed: it fetches the OHIF build ({OHIF_PACKAGE}); install Debian's npm")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as work:
        result = subprocess.run(
            [npm, "pack", OHIF_PACKAGE, "--silent"], cwd=work, capture_output=True, text=True, timeout=600
        )
        tarballs = list(Path(work).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            raise ViewerError(f"npm pack {OHIF_PACKAGE} failed: {result.stderr.strip()[-500:]}")
        with tarfile.open(tarballs[0]) as archive:
            archive.extractall(work, filter="data")
        if not (Path(work) / "package" / "dist" / "index.html").is_file():
            raise ViewerError(f"{OHIF_PACKAGE} has no dist/index.html")
        shutil.rmtree(root / "package", ignore_errors=True)
        (Path(work) / "package").rename(root / "package")
    return dist


NGINX_CONF = """\
{user}
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {dist};
        location = /app-config.js {{
            alias {app_config};
            add_header Cache-Control no-store;
        }}
        location /dicom-web/ {{
            proxy_pass http://127.0.0.1:{orthanc}/dicom-web/;
            proxy_buffering off;
        }}
        location /wado {{
            proxy_pass http://127.0.0.1:{orthanc}/wado;
        }}
        location / {{
            try_files $uri $uri/ /index.html;
        }}
    }}
}}
"""


class Nginx:
    """nginx as a plain process (``daemon off``) with every path in ``folder``."""

    def __init__(self, folder: Path, *, dist: Path, app_config: Path, orthanc_http_port: int, port: int = 0) -> None:
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
        if binary is None:
            raise ViewerError("nginx is not installed: apt-get install nginx")
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        conf = folder / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                # nginx started as root runs its workers as nobody, who may not read ~/.cache.
                user="user root root;" if os.geteuid() == 0 else "",
                tmp=folder,
                port=self.port,
                dist=dist,
                app_config=app_config,
                orthanc=orthanc_http_port,
            )
        )
        self.log = folder / "nginx-error.log"
        with (folder / "nginx.out").open("wb") as out:
            self.process = subprocess.Popen(
                [binary, "-p", str(folder), "-c", str(conf), "-e", str(self.log)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_http(self.url + "/app-config.js", self.process, self.log, "nginx")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class ResultSeries:
    kind: str  # source, sc, pm, seg_binary, seg_fractional, sr
    series_uid: str
    description: str
    modality: str


@dataclass
class StudyResults:
    study_uid: str
    orthanc_id: str
    name: str
    series: list[ResultSeries] = field(default_factory=list)

    def by_kind(self, kind: str) -> ResultSeries:
        return next(s for s in self.series if s.kind == kind)

    def kinds(self) -> set[str]:
        return {s.kind for s in self.series}


def ohif_link(base_url: str, study_uid: str, series_uid: str | None = None) -> str:
    query = {"StudyInstanceUIDs": study_uid}
    if series_uid:
        query["SeriesInstanceUIDs"] = series_uid
    return f"{base_url}/viewer?{urllib.parse.urlencode(query)}"


class ViewerStack:
    """Orthanc + node + nginx/OHIF in ``folder``; ``start()``, ``send_demo_studies()``, ``stop()``."""

    def __init__(
        self,
        folder: Path,
        *,
        port: int = 0,
        outputs: tuple[str, ...] = ALL_OUTPUTS,
        method: str = "gradcam",
        cache_dir: Path | None = None,
        app_config: Path = APP_CONFIG,
    ) -> None:
        self.folder = Path(folder)
        self.port = port
        self.outputs = outputs
        self.method = method
        self.cache_dir = cache_dir
        self.app_config = app_config
        self.orthanc: OrthancProcess | None = None
        self.node = None
        self.nginx: Nginx | None = None

    def start(self) -> None:

        if not self.app_config.is_file():
            raise ViewerError(f"OHIF config not found: {self.app_config}")
        dist = ensure_ohif(self.cache_dir)
        try:
            self.orthanc = OrthancProcess(self.folder / "orthanc")
            overrides = {
                "listener": {"port": 0, "ae_title": "PACSXAI"},
                "storage": {"data_dir": str(self.folder / "node")},
                "destinations": [
                    {
                        "name": "pacs",
                        "ae_title": self.orthanc.ae_title,
                        "host": "127.0.0.1",
                        "port": self.orthanc.dicom_port,
                    }
                ],
                "allowed_callers": [{"ae_title": self.orthanc.ae_title, "host": "127.0.0.1"}],
                "assembly": {"idle_seconds": 0.5, "max_wait_seconds": 30},
                "explain": {"methods": [self.method], "outputs": list(self.outputs)},
                "metrics": {"port": 0},
            }
            self.node = Node(load_config(None, overrides))
            self.node.start()
            self.orthanc.add_modality("xai", "PACSXAI", "127.0.0.1", self.node.port)
            self.nginx = Nginx(
                self.folder / "nginx",
                dist=dist,
                app_config=self.app_config.resolve(),
                orthanc_http_port=self.orthanc.http_port,
                port=self.port,
            )
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        assert self.nginx is not None
        return self.nginx.url

    def send_demo_studies(self, count: int, timeout: float = 120.0) -> list[StudyResults]:
        """Write ``count`` phantom studies, upload them to Orthanc, route each to the node, wait for results."""

        assert self.orthanc is not None
        written = write_phantom_studies(self.folder / "phantoms", studies=count, rows=512, cols=480)
        studies = []
        for path, _phantom in written:
            study_id = self.orthanc.upload(path)["ParentStudy"]
            self.orthanc.send_study("xai", study_id)
            studies.append((study_id, path.stem))
        expected = 1 + len(self.outputs)
        deadline = time.monotonic() + timeout
        results: list[StudyResults] = []
        for study_id, name in studies:
            while True:
                found = self.study_results(study_id, name)
                if len(found.series) >= expected or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            results.append(found)
        return results

    def study_results(self, study_id: str, name: str = "") -> StudyResults:
        assert self.orthanc is not None
        study = self.orthanc.get(f"/studies/{study_id}")
        found = StudyResults(study["MainDicomTags"]["StudyInstanceUID"], study_id, name)
        for series in self.orthanc.get(f"/studies/{study_id}/series"):
            tags = series["MainDicomTags"]
            instance = series["Instances"][0]
            instance_tags = self.orthanc.get(f"/instances/{instance}/simplified-tags")
            sop = instance_tags.get("SOPClassUID", "")
            if sop == SEGMENTATION:
                kind = "seg_" + str(instance_tags.get("SegmentationType", "")).lower()
            else:
                kind = SOP_KIND.get(sop, "source")
            found.series.append(
                ResultSeries(
                    kind, tags["SeriesInstanceUID"], tags.get("SeriesDescription", ""), tags.get("Modality", "")
                )
            )
        order = ["source", *ALL_OUTPUTS]
        found.series.sort(key=lambda s: order.index(s.kind) if s.kind in order else len(order))
        return found

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
            self.nginx = None
        if self.node is not None:
            self.node.stop()
            self.node = None
        if self.orthanc is not None:
            self.orthanc.stop()
            self.orthanc = None
