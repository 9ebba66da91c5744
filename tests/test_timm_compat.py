"""The one seam with timm and torch (rmt/timm_compat.py): each private name still where rmt takes it from, the
load_checkpoint route for RMT models only, a loud failure when timm moves a name, and no import cycle in rmt."""
import ast
import importlib.util
import sys
import types

import pytest
import timm
import torch
from torch import nn

import rmt
from rmt import timm_compat
from timm.models import _builder, _factory, _helpers

from tests.helpers import REPO, SMALL_CHECKPOINT, small_kwargs

PACKAGE = REPO / 'rmt'


def _module_names():
    """Every module of the package by dotted name (``rmt``, ``rmt.model``, ``rmt.attention`` for a package, ...)."""
    names = {}
    for path in PACKAGE.rglob('*.py'):
        parts = list(path.relative_to(REPO).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        names['.'.join(parts)] = path
    return names


def import_graph():
    """``{module: modules of rmt it imports}``, from every import statement in it, those inside functions too
    (a lazy import is how the last cycle hid). ``from .x import y`` is an edge to ``x.y`` where that is a module."""
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')[:len(package.split('.')) - node.level + 1]
                    base = '.'.join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ''
                edges.update(f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[name] = sorted(e for e in edges if e in modules and e != name)
    return graph


def find_cycle(graph):
    """A list of modules that import each other in a circle (first repeated at the end), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 'done'
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert 'rmt.checkpoint' in graph['rmt.model'] and 'rmt.position' in graph['rmt.checkpoint']  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_cycle_finder_finds_a_lazy_import_cycle():
    graph = dict(import_graph())
    graph['rmt.checkpoint'] = graph['rmt.checkpoint'] + ['rmt.model']  # what _is_rmt's lazy import was
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and {'rmt.checkpoint', 'rmt.model'} <= set(cycle)


def _private_uses(path):
    """``timm`` / ``torch`` names with a private part (``_x``, not dunders) a module imports or reads."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] in ('timm', 'torch'):
            names = node.module.split('.') + [a.name for a in node.names]
            if any(n.startswith('_') and not n.startswith('__') for n in names):
                found.append(f'{node.module}: {", ".join(a.name for a in node.names)}')
        elif isinstance(node, ast.Attribute) and node.attr.startswith('_') and not node.attr.startswith('__'):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in ('timm', 'torch', 'nn', 'F'):
                found.append(ast.unparse(node))
    return found


def test_only_timm_compat_reaches_into_private_timm_and_torch_names():
    uses = {str(p.relative_to(REPO)): _private_uses(p) for p in PACKAGE.rglob('*.py') if p.name != 'timm_compat.py'}
    assert {k: v for k, v in uses.items() if v} == {}
    assert _private_uses(PACKAGE / 'timm_compat.py')  # the checker sees them where they are


def test_private_names_are_still_what_rmt_uses_them_as():
    assert timm_compat.feature_take_indices(4, None) == ([0, 1, 2, 3], 3)
    assert timm_compat.feature_take_indices(4, 2) == ([2, 3], 3)
    assert _builder.FeatureGetterNet is timm_compat.FeatureGetterNet  # the class build_model_with_cfg checks
    assert issubclass(rmt.RMTFeatures, timm_compat.FeatureGetterNet)
    for norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.LazyBatchNorm2d):
        assert issubclass(norm, timm_compat.BatchNorm), norm
    assert not issubclass(nn.LayerNorm, timm_compat.BatchNorm)
    assert timm_compat.TIMM_LOAD_CHECKPOINT.__module__ == 'timm.models._helpers'
    assert 'load_checkpoint' in _factory.create_model.__code__.co_names  # what checkpoint_path= calls


def test_import_rmt_routes_load_checkpoint_wherever_timm_looks_it_up():
    for module in (timm.models, _helpers, _factory):
        assert module.load_checkpoint is timm_compat.load_checkpoint, module.__name__


@pytest.fixture
def timms_function_spy(monkeypatch):
    """Calls of timm's own load_checkpoint, recorded by model class name."""
    calls = []
    original = timm_compat.TIMM_LOAD_CHECKPOINT

    def spy(model, checkpoint_path, *args, **kwargs):
        calls.append(type(model).__name__)
        return original(model, checkpoint_path, *args, **kwargs)

    monkeypatch.setattr(timm_compat, 'TIMM_LOAD_CHECKPOINT', spy)
    return calls


def test_other_models_load_checkpoints_with_timms_function_unchanged(timms_function_spy, tmp_path):
    other = timm.create_model('test_resnet')
    torch.save(other.state_dict(), tmp_path / 'resnet.pth')
    loaded = timm.create_model('test_resnet', checkpoint_path=str(tmp_path / 'resnet.pth'))
    timm.models.load_checkpoint(loaded, str(tmp_path / 'resnet.pth'))
    assert timms_function_spy == ['ResNet', 'ResNet']
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), other.state_dict().values()))


def test_rmt_models_and_their_backbones_load_checkpoints_with_rmts_loader(timms_function_spy):
    timm.create_model('rmt_t', checkpoint_path=str(SMALL_CHECKPOINT), **small_kwargs())
    timm.create_model('rmt_t', features_only=True, checkpoint_path=str(SMALL_CHECKPOINT), **small_kwargs())
    timm.models.load_checkpoint(timm.create_model('rmt_t', **small_kwargs()), str(SMALL_CHECKPOINT))
    assert timms_function_spy == []


@pytest.fixture
def restored_homes(monkeypatch):
    """The homes of load_checkpoint and the route as they are now, put back after the test."""
    for module in (timm.models, _helpers, _factory):
        monkeypatch.setattr(module, 'load_checkpoint', module.load_checkpoint)
    monkeypatch.setattr(timm_compat, '_route', timm_compat._route)


def test_a_moved_load_checkpoint_is_a_warning_naming_it_and_the_other_homes_still_route(restored_homes, monkeypatch):
    monkeypatch.delattr(_factory, 'load_checkpoint')
    monkeypatch.setattr(timm.models, 'load_checkpoint', timm_compat.TIMM_LOAD_CHECKPOINT)
    with pytest.warns(RuntimeWarning, match=r'moved load_checkpoint \(timm\.models\._factory\); there RMT checkpoints '
                                            r'are read by timm'):
        assert timm_compat.route_load_checkpoint(lambda m: False, None) is False
    assert timm.models.load_checkpoint is _helpers.load_checkpoint is timm_compat.load_checkpoint


def test_create_model_no_longer_calling_load_checkpoint_is_a_warning(restored_homes, monkeypatch):
    monkeypatch.setattr(_factory, 'create_model', lambda *args, **kwargs: None)
    with pytest.warns(RuntimeWarning, match=r'moved load_checkpoint \(timm\.models\.create_model '
                                            r'\(checkpoint_path=\)\)'):
        timm_compat.route_load_checkpoint(lambda m: False, None)


def test_a_private_name_timm_no_longer_has_stops_the_import_with_its_name(monkeypatch):
    monkeypatch.setitem(sys.modules, 'timm.models._features', types.ModuleType('timm.models._features'))
    spec = importlib.util.spec_from_file_location('timm_compat_copy', PACKAGE / 'timm_compat.py')
    with pytest.raises(ImportError, match=rf'rmt needs timm\.models\._features\.FeatureGetterNet and '
                                          rf'feature_take_indices, which timm {timm.__version__} does not have'):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
