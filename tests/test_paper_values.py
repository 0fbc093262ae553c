"""The paper's hyperparameters (appendix Tables 11-15, kept in experiments/paper/hparams.yaml) against what qclip runs:
the full-scale runs of experiments/*.yaml, the mm recipes (qclip.mm.RECIPES) and the jobs' defaults where a spec
relies on them. Every value of the paper is checked somewhere or listed as a deviation with its reason, and a changed
value fails (the last tests change some and watch them fail)."""
import math, shutil
from functools import lru_cache
from pathlib import Path
import pytest, yaml
from qclip.jobs import load_experiment

ROOT = Path(__file__).parents[1]
HPARAMS = ROOT/'experiments'/'paper'/'hparams.yaml'
PAPER_TEXT = ROOT.parent/'shared'/'paper'/'clip-quality-captions-2405.08911.txt'  # the paper as text, where this checkout has it
TABLES = yaml.safe_load(HPARAMS.read_text())['tables']
ROWS = [(t['table'], r) for t in TABLES for r in t['rows']]
DENSE = ('21_segmentation', '22_detection', '23_depth')

@lru_cache(None)
def experiment(spec:str, root:str=str(ROOT/'experiments'))->dict: return load_experiment(Path(root)/spec)

def stage_runs(target:str, root:str)->list[dict]:
    spec, stage = target.split(':')
    return [r for r in experiment(spec, root)['runs'] if r['stage'] == stage]

def effective(run:dict, key:str):
    "The value a run trains with: its own, else its mm recipe's, else its job's default (None: not a parameter of the job)."
    p, nb = run['params'], Path(run['notebook']).stem
    if p.get(key) is not None: return p[key]
    if nb in ('21_segmentation', '22_detection'):
        from qclip.mm import RECIPES
        return RECIPES[p['recipe']].get(key)
    if nb == '20_classification':
        from qclip.finetune import check_cls_params
        return check_cls_params(mode=p.get('mode', 'finetune')).get(key)  # lr, weight_decay: the mode's defaults
    if nb == '23_depth':
        from qclip.finetune import DEPTH_DEFAULTS
        return DEPTH_DEFAULTS.get(key)
    if nb == '10_pretrain':
        from qclip.train import PRETRAIN_DEFAULTS
        return PRETRAIN_DEFAULTS.get(key)

def same(a, b)->bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, bool) or isinstance(b, bool): return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)): return math.isclose(a, b, rel_tol=1e-9)
    return a == b

def global_batch(run:dict)->int:
    res = run['resources']
    return effective(run, 'batch_size') * res['nodes'] * res['nproc_per_node']

def check(c:dict, root=ROOT/'experiments')->list[str]:
    "What does not hold of one check of hparams.yaml (empty: it holds)."
    bad = []
    if 'at' in c:
        for target in c['at']:
            runs = stage_runs(target, str(root))
            if not runs: bad.append(f"{target}: no such stage (or no runs) at full scale"); continue
            if 'global_batch' in c:
                got = sorted({global_batch(r) for r in runs})
                if got != [c['global_batch']]: bad.append(f"{target}: global batch {got}, paper {c['global_batch']}")
            elif 'epochs' in c:
                for r in runs:
                    e = effective(r, c['param']) * global_batch(r) / c['images']
                    if abs(e - c['epochs']) > global_batch(r) / c['images']:
                        bad.append(f"{r['name']} ({target}): {c['param']} {effective(r, c['param'])} x {global_batch(r)} = {e:.3f} "
                                   f"epochs of {c['images']:,} images, paper {c['epochs']}")
            elif 'sweep' in c:
                by_encoder = {}
                for r in runs: by_encoder.setdefault(str(r['params'].get('encoder')), []).append(effective(r, c['param']))
                for enc, vs in by_encoder.items():  # each value, as often as the others (a product with the other swept parameter)
                    if sorted(set(vs)) != sorted(c['sweep']) or len({vs.count(v) for v in vs}) != 1:
                        bad.append(f"{target}: the runs of encoder {enc} sweep {c['param']} over {sorted(vs)}, paper {c['sweep']}")
            else:
                got = {repr(effective(r, c['param'])) for r in runs if not same(effective(r, c['param']), c['value'])}
                if got: bad.append(f"{target}: {c['param']} = {', '.join(sorted(got))}, paper {c['value']!r}")
    elif 'recipes' in c:
        from qclip.mm import RECIPES
        for name in c['recipes']:
            r = RECIPES[name]
            got = r['batch_size'] * r['gpus'] if 'global_batch' in c else r.get(c['key'])
            want = c.get('global_batch', c.get('value'))
            if not same(got, want): bad.append(f"recipe {name}: {c.get('key', 'batch_size x gpus')} = {got!r}, paper {want!r}")
    elif 'code' in c:
        text = (ROOT/c['code']).read_text()
        if 'contains' in c and c['contains'] not in text: bad.append(f"{c['code']} no longer contains {c['contains']!r}")
        if 'lacks' in c and c['lacks'].lower() in text.lower(): bad.append(f"{c['code']} mentions {c['lacks']!r} (paper: 0, off)")
    elif 'open_clip' in c:
        import open_clip
        v = open_clip.get_model_config(c['open_clip'])
        for k in c['key'].split('.'): v = v[k]
        if not same(v, c['value']): bad.append(f"open_clip {c['open_clip']} {c['key']} = {v!r}, paper {c['value']!r}")
    else: bad.append(f"unknown check {c!r}")
    return bad

@pytest.mark.parametrize('table,row', ROWS, ids=[f"table{t}:{r['name']}" for t, r in ROWS])
def test_paper_value(table, row):
    "Each row is checked where qclip states it, or says why qclip differs; every check holds."
    assert row.get('checks') or row.get('deviation'), f"Table {table} {row['name']!r}: neither a check nor a documented deviation"
    bad = [m for c in row.get('checks') or [] for m in check(c)]
    assert not bad, f"Table {table} {row['name']!r} (paper: {', '.join(row['paper'])}):\n  " + '\n  '.join(bad)

def _full_runs(notebooks)->dict:
    "{run folder: 'spec:stage'} of every full-scale run of these job notebooks (specs that extend another share its folders)."
    out = {}
    for spec in sorted((ROOT/'experiments').glob('*.yaml')):
        for r in experiment(spec.name)['runs']:
            if Path(r['notebook']).stem in notebooks and not r.get('linked'): out.setdefault(str(r['dir']), f"{spec.name}:{r['stage']}")
    return out

def _checked(pred)->set[str]:
    "Run folders of the stages that the checks satisfying `pred` hold to the paper."
    return {str(r['dir']) for _, row in ROWS for c in row.get('checks') or [] if pred(row, c)
            for t in c.get('at', []) for r in stage_runs(t, str(ROOT/'experiments'))}

def test_every_full_scale_stage_is_held_to_the_paper():
    "A new spec's stage cannot slip past: dense stages sweep as Tables 13-15, classification runs Table 12's epochs, and so on."
    for notebooks, pred, what in [
            (DENSE, lambda row, c: 'sweep' in c and c['param'] == 'lr', "swept over the paper's lr (Tables 13-15)"),
            (DENSE, lambda row, c: 'sweep' in c and c['param'] == 'drop_path', "swept over the paper's drop path (Tables 13-15)"),
            (('20_classification',), lambda row, c: row['name'] == 'Train epochs' and c.get('images') == 1281167, "held to Table 12"),
            (('10_pretrain',), lambda row, c: c.get('global_batch') == 65536, "held to Table 11's global batch")]:
        runs, ok = _full_runs(notebooks), _checked(pred)
        missed = sorted({s for d, s in runs.items() if d not in ok})
        assert not missed, f"stages not {what}: {missed} (add them to experiments/paper/hparams.yaml)"

def test_mm_stages_run_on_the_recipes_gpus():
    "An mm recipe's global batch is batch_size per process x `gpus`: a full-scale stage must give it that many processes."
    from qclip.mm import RECIPES
    for spec in sorted((ROOT/'experiments').glob('*.yaml')):
        for r in experiment(spec.name)['runs']:
            if Path(r['notebook']).stem in ('21_segmentation', '22_detection'):
                world = r['resources']['nodes'] * r['resources']['nproc_per_node']
                assert world == RECIPES[r['params']['recipe']]['gpus'], f"{spec.name} {r['name']}: {world} processes"

def _paper_rows(text:str)->dict:
    "{table: [(row name, [cells as printed])]} of appendix Tables 11-15 in the paper's text."
    lines, out = text.splitlines(), {}
    for i, l in enumerate(lines):
        if l[:9] in {f'Table {n}:' for n in range(11, 16)}:
            head = max(j for j in range(i) if lines[j].startswith('Hyperparameter'))
            rows = [l.split('\t') for l in lines[head + 1:i] if l.strip() and not l.startswith('\t')]
            out[int(l[6:8])] = [(r[0].strip(), [c.strip() for c in r[1:] if c.strip()]) for r in rows]
    return out

@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason='the paper text is not beside this checkout')
def test_file_has_every_row_of_the_paper_as_printed():
    paper = _paper_rows(PAPER_TEXT.read_text())
    assert sorted(paper) == [11, 12, 13, 14, 15]
    ours = {t['table']: [(r['name'], r['paper']) for r in t['rows']] for t in TABLES}
    assert ours == paper

def test_a_changed_value_fails(tmp_path):
    "The checks can fail: a different value, sweep, batch, schedule, recipe value or code text each does."
    wrong = [{'at': ['table1.yaml:finetune'], 'param': 'lr', 'value': 2.0e-4},
             {'at': ['table1.yaml:depth'], 'param': 'lr', 'sweep': [5.0e-4, 2.0e-4, 1.0e-4]},
             {'at': ['table1.yaml:finetune'], 'global_batch': 2048},
             {'at': ['table1.yaml:finetune'], 'param': 'steps', 'epochs': 90, 'images': 1281167},
             {'at': ['table1.yaml:finetune'], 'param': 'weight_decay', 'value': 0.1},  # the job's default, not in the spec
             {'at': ['table1.yaml:nope'], 'param': 'lr', 'value': 1.0e-4},
             {'recipes': ['upernet-vit'], 'key': 'iters', 'value': 80000},
             {'recipes': ['semfpn-mci'], 'global_batch': 16},
             {'code': 'qclip/mm.py', 'contains': "type='SGD', lr="},
             {'code': 'qclip/mm.py', 'lacks': 'AdamW'},
             {'open_clip': 'ViT-B-16', 'key': 'vision_cfg.image_size', 'value': 336}]
    for c in wrong: assert check(c), c
    # and a spec that drifts from the paper: Table 1's depth sweep without drop path 0.2, its fine-tuning at 50 epochs
    for f in (ROOT/'experiments').glob('*.yaml'): shutil.copy(f, tmp_path/f.name)
    spec = yaml.safe_load((tmp_path/'table1.yaml').read_text())
    spec['stages']['depth']['grid']['drop_path'].remove(0.2)
    spec['stages']['finetune']['params']['steps'] //= 2
    (tmp_path/'table1.yaml').write_text(yaml.safe_dump(spec, sort_keys=False))
    rows = {(t, r['name']): r for t, r in ROWS}
    msgs = [m for c in rows[15, 'Stochastic depth rate']['checks'] + rows[12, 'Train epochs']['checks'] for m in check(c, root=tmp_path)]
    assert any('table1.yaml:depth' in m and 'drop_path' in m for m in msgs), msgs
    assert any('finetune/' in m and '50.000 epochs' in m for m in msgs), msgs
    assert not [m for c in rows[15, 'Stochastic depth rate']['checks'] + rows[12, 'Train epochs']['checks'] for m in check(c)]
