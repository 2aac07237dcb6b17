"""Plotly figures for the app (pure functions of data; no Gradio)."""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
import torch

from app.chat_engine import Conversation
from steering.axis_math import LayerSummary, PCAResult, pca, project

STEERED_COLOR = "#d62728"
BASELINE_COLOR = "#1f77b4"
TAU_COLOR = "#2ca02c"
SCORE_COLORS = {0: "#9e9e9e", 1: "#fdae61", 2: "#abd9e9", 3: "#2c7bb6"}


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 320) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=14)), xaxis_title=x, yaxis_title=y,
                      height=height, margin=dict(l=50, r=20, t=40, b=40), template="plotly_white",
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return fig


def empty_figure(title: str, message: str = "nothing to show yet") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=13, color="#888"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, "", "", height=260)


def projection_figure(conversation: Conversation, layer: int) -> go.Figure:
    """Projection on the axis at ``layer`` for every generated token, turn after turn, with tau."""
    title = f"Projection on the axis per token, layer {layer}"
    if not conversation.turns:
        return empty_figure(title, "send a message to see the projection of each generated token")
    fig = go.Figure()
    offset = 0
    steered_x, steered_y, steered_text = [], [], []
    base_x, base_y = [], []
    tau_x, tau_y = [], []
    for number, turn in enumerate(conversation.turns, start=1):
        s = turn.steered.series(layer)
        b = turn.baseline.series(layer) if turn.baseline is not None else []
        width = max(len(s), len(b), 1)
        steered_x += [offset + i for i in range(len(s))] + [None]
        steered_y += s + [None]
        steered_text += [f"turn {number}"] * len(s) + [None]
        base_x += [offset + i for i in range(len(b))] + [None]
        base_y += b + [None]
        if layer in turn.thresholds:
            tau_x += [offset, offset + width - 1, None]
            tau_y += [turn.thresholds[layer]] * 2 + [None]
        if number > 1:
            fig.add_vline(x=offset - 0.5, line=dict(color="#bbb", width=1, dash="dot"))
        offset += width
    if tau_x:  # drawn first, wide and light, so a capped (steered == tau) stretch stays visible on top
        fig.add_trace(go.Scatter(x=tau_x, y=tau_y, mode="lines", name="tau (cap floor)", opacity=0.6,
                                 line=dict(color=TAU_COLOR, width=5, dash="dash")))
    if any(v is not None for v in base_y):
        fig.add_trace(go.Scatter(x=base_x, y=base_y, mode="lines", name="unsteered",
                                 line=dict(color=BASELINE_COLOR, width=1.5)))
    fig.add_trace(go.Scatter(x=steered_x, y=steered_y, mode="lines", name="steered", text=steered_text,
                             line=dict(color=STEERED_COLOR, width=2)))
    return _layout(fig, title, "generated token (all turns)", "projection")


def drift_figure(conversation: Conversation, layer: int) -> go.Figure:
    """Mean projection per turn (persona drift) for both threads, with tau."""
    title = f"Mean projection per turn (persona drift), layer {layer}"
    if not conversation.turns:
        return empty_figure(title, "one point per turn")
    turns = list(range(1, len(conversation.turns) + 1))
    steered = [t.steered.mean_projection(layer) for t in conversation.turns]
    baseline = [t.baseline.mean_projection(layer) if t.baseline is not None else None for t in conversation.turns]
    fig = go.Figure()
    if any(v is not None for v in baseline):
        fig.add_trace(go.Scatter(x=turns, y=baseline, mode="lines+markers", name="unsteered",
                                 line=dict(color=BASELINE_COLOR)))
    fig.add_trace(go.Scatter(x=turns, y=steered, mode="lines+markers", name="steered",
                             line=dict(color=STEERED_COLOR)))
    taus = [t.thresholds.get(layer) for t in conversation.turns]
    if any(v is not None for v in taus):
        fig.add_trace(go.Scatter(x=turns, y=taus, mode="lines+markers", name="tau",
                                 line=dict(color=TAU_COLOR, dash="dash"), marker=dict(symbol="line-ew-open")))
    fig.update_xaxes(dtick=1)
    return _layout(fig, title, "turn", "mean projection", height=280)


def pca_figure(names: Sequence[str], role_vectors: torch.Tensor, axis: torch.Tensor, layer: int,
               default_vector: torch.Tensor | None = None) -> tuple[go.Figure, PCAResult]:
    """Roles in the plane of PC1/PC2 at one layer, coloured by their projection on the axis.

    Args:
        role_vectors: ``[R, D]`` at ``layer``; axis: ``[D]``; default_vector: ``[D]`` (drawn as a star).
    """
    result = pca(role_vectors, axis, n_components=2)
    scores = result.scores
    colours = project(role_vectors, axis)
    pc2 = scores[:, 1] if scores.shape[1] > 1 else torch.zeros(scores.shape[0])
    fig = go.Figure(go.Scatter(
        x=scores[:, 0].tolist(), y=pc2.tolist(), mode="markers", name="roles", text=list(names),
        customdata=colours.tolist(),
        hovertemplate="<b>%{text}</b><br>PC1 %{x:.2f}, PC2 %{y:.2f}<br>projection %{customdata:.2f}<extra></extra>",
        marker=dict(size=9, color=colours.tolist(), colorscale="RdBu", showscale=True,
                    colorbar=dict(title="proj. on axis"), line=dict(width=0.5, color="#333")),
    ))
    if default_vector is not None:
        centred = default_vector.float() - result.mean
        point = centred @ result.components.T
        fig.add_trace(go.Scatter(
            x=[float(point[0])], y=[float(point[1]) if point.numel() > 1 else 0.0], mode="markers",
            name="default (Assistant)", text=["default"], hovertemplate="<b>default</b><extra></extra>",
            marker=dict(symbol="star", size=16, color="gold", line=dict(width=1, color="#333")),
        ))
    ev = result.explained_variance_ratio.tolist() + [0.0]
    title = (f"Role vectors, layer {layer}: PC1 {ev[0]:.0%}, PC2 {ev[1]:.0%} of variance; "
             f"cos(axis, PC1) = {result.pc1_axis_cosine:.2f}")
    return _layout(fig, title, "PC1", "PC2", height=460), result


def layer_summary_figure(summary: LayerSummary) -> go.Figure:
    """Per layer: variance explained by PC1/PC2, cosine of the axis with PC1, and the axis norm."""
    layers = list(range(len(summary.axis_norm)))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers, y=summary.pc1_variance_explained.tolist(), name="PC1 variance explained"))
    fig.add_trace(go.Scatter(x=layers, y=summary.pc2_variance_explained.tolist(), name="PC2 variance explained"))
    fig.add_trace(go.Scatter(x=layers, y=summary.pc1_axis_cosine.tolist(), name="cos(axis, PC1)"))
    fig.add_trace(go.Scatter(x=layers, y=summary.axis_norm.tolist(), name="axis norm", yaxis="y2",
                             line=dict(dash="dot", color="#555")))
    fig.update_layout(yaxis=dict(range=[0, 1.05]),
                      yaxis2=dict(title="axis norm", overlaying="y", side="right", showgrid=False))
    return _layout(fig, "Per layer: PCA of role vectors and the axis", "layer", "fraction / cosine", height=360)


def score_histogram(roles: Sequence[str], scores: Sequence[int | None]) -> go.Figure:
    """Judge scores (0-3) counted per role, stacked; unscored responses are left out."""
    pairs = [(r, s) for r, s in zip(roles, scores) if s is not None]
    if not pairs:
        return empty_figure("Judge scores per role", "no judge scores yet")
    order = sorted({r for r, _ in pairs})
    fig = go.Figure()
    for score in range(4):
        counts = [sum(1 for r, s in pairs if r == role and s == score) for role in order]
        fig.add_trace(go.Bar(x=order, y=counts, name=f"score {score}", marker_color=SCORE_COLORS[score]))
    fig.update_layout(barmode="stack")
    return _layout(fig, "Judge scores per role", "role", "responses", height=340)
