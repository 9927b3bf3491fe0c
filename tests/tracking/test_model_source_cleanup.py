"""fetch_checkpoint's default download folder does not outlive the process that fetched the checkpoint."""

import subprocess
import sys
import textwrap
from pathlib import Path


def test_the_default_download_folder_is_removed_when_the_process_exits(tmp_path, mlflow_store):
    script = textwrap.dedent(
        """
        import sys
        from avlm.tracking import model_source

        folders = []
        real = model_source.tempfile.mkdtemp
        model_source.tempfile.mkdtemp = lambda **kw: folders.append(real(**kw)) or folders[-1]
        try:
            model_source.fetch_checkpoint("0" * 32)  # no such run: refused, after the folder was made
        except Exception as err:
            print(type(err).__name__)
        print(folders[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    error, folder = out.stdout.split()
    assert error == "ConfigError"
    assert not Path(folder).exists()
