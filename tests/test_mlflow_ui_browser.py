"""The MLflow UI (as `make ui` starts it) opens the experiment in the model-training view and shows the PPO run
and its KL curve, in real headless Chromium."""

import os
import shutil
import signal
import socket
import subprocess
import time

import httpx
import pytest

from .conftest import BIN

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_mlflow_ui_lists_the_ppo_run_and_its_kl_metric(work_env, tmp_path):
    from playwright.sync_api import sync_playwright

    from rlhf_core.tracking import stage_run

    with stage_run("ppo", metrics_dir=work_env / "metrics") as run:
        for update in range(5):
            run.log_step({"ppo/kl": 0.1 * update, "ppo/score": 0.2 * update}, step=update)
        run.finish({"ppo/final_kl": 0.4})
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "ui", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            raise AssertionError("MLflow UI did not start")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            import mlflow

            from rlhf_core.tracking import ui_url

            experiment = mlflow.get_experiment_by_name("rlhf")
            assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
            page.set_default_timeout(60_000)
            # MLflow 3.17 opens an experiment in the GenAI view (Overview, Traces) unless the link asks for
            # the model-training one; the kind tag alone does not change that.
            page.goto(ui_url(base, experiment.experiment_id))
            page.get_by_text("matching run").first.wait_for()
            # the model-training side bar links the model registry; the GenAI one lists judges instead
            assert page.get_by_text("Model registry").count() > 0 and page.get_by_text("Judges").count() == 0
            page.get_by_text("ppo", exact=True).first.click()
            page.get_by_text("ppo/kl").first.wait_for()
            assert run.run_id in page.url
            page.screenshot(path=str(tmp_path / "mlflow_run.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
