"""Plots that save to a path leave matplotlib's backend as it was: in a notebook (the results page, JupyterLab) a switch
to Agg turns off inline display, and every later figure of the page is not shown. Each case runs in its own process whose
backend is the inline one, as in a Jupyter kernel."""
import subprocess, sys, textwrap
from pathlib import Path
import pytest

INLINE = 'module://matplotlib_inline.backend_inline'
SETUP = f"""
import matplotlib; matplotlib.use({INLINE!r})
import numpy as np, pandas as pd
"""
CASES = {
    'attention.plot_distances': """
from qclip.attention import plot_distances
df = pd.DataFrame([dict(model=m, layer=l, head=h, distance=10. + l + h) for m in 'ab' for l in (1, 2) for h in (0, 1)])
plot_distances(df, dict(a=12., b=12.), path=PATH, title='t')
""",
    'quality.plot_quality': """
from qclip.quality import plot_quality, quality_summary
caps = ['a red square', 'a blue circle on grass', 'green triangle', 'a photo']
frame = pd.DataFrame([dict(dataset='synth-align', caption_source=s, uid=f'{i}', caption=c, words=len(c.split()),
                           clip_score=20. + i) for s in ('gt', 'syn') for i, c in enumerate(caps)])
plot_quality(frame, quality_summary(frame), PATH)
""",
    'quality.plot_quality_vs_transfer': """
from qclip.quality import plot_quality_vs_transfer
df = pd.DataFrame(dict(dataset=['a', 'b', 'c'], caption_source='gt', clip_score=[1., 2., 3.], words=[3., 5., 4.],
                       **{'IN-1K Linear': [.1, .3, .2]})).set_index(['dataset', 'caption_source'])
plot_quality_vs_transfer(df, PATH, measures=('clip_score', 'words'))
""",
    'core.plot_curves': """
from qclip.core import plot_curves
plot_curves([dict(step=s, loss=1. / s, top1=s / 10.) for s in range(1, 6)], PATH, ['top1'], 'held-out')
""",
    'probes._figure': """
import torch
from qclip.probes import _figure
a = dict(images=torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), seg=torch.randint(0, 9, (4, 16, 16)),
         depth=torch.rand(4, 1, 16, 16) * 10)
_figure(a, a['seg'], a['depth'][:, 0], PATH)
""",
}

@pytest.mark.parametrize('case', list(CASES))
def test_plot_with_path_keeps_the_inline_backend(case, tmp_path):
    path = tmp_path/'fig.png'
    code = SETUP + f"PATH = {str(path)!r}\n" + textwrap.dedent(CASES[case]) + "print(matplotlib.get_backend())\n"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == INLINE, (case, r.stdout[-500:])  # not switched to Agg
    assert path.stat().st_size > 1000  # and the figure is written
