"""The demo's two figures: the image branch's score over (block, timestep), and a t-SNE of held-out features."""

from __future__ import annotations

import numpy as np

HEATMAP_FILE = "image_block_timestep_map.png"
TSNE_FILE = "tsne_image_text_fused.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def heatmap(heat, blocks, timesteps, search, path):
    """Draw ``heat`` (CV mAP, blocks x timesteps) with the joint search's path over it; save to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    image = ax.imshow(100 * heat, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(timesteps)), [str(t) for t in timesteps])
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("diffusion timestep t")
    ax.set_ylabel("DiT block")
    head = search.estimator["clf"]
    ax.set_title(
        f"Image branch alone: {search.n_splits_}-fold CV mAP over (block, timestep)\n"
        f"(head of the search's candidates: {head.projection_dim} wide, {head.max_epochs} epochs)",
        fontsize=10,
    )
    for i in range(heat.shape[0]):
        for j in range(heat.shape[1]):
            bright = heat[i, j] > np.nanmin(heat) + 0.6 * (np.nanmax(heat) - np.nanmin(heat))
            ax.text(
                j,
                i,
                f"{100 * heat[i, j]:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if bright else "white",
                zorder=3,  # above the search path, so every score stays readable
            )
    # Where the joint local search went (its image coordinates), start to end.
    path_points = [
        (
            timesteps.index(p["params"]["features__image__timestep"]),
            blocks.index(p["params"]["features__image__block"]),
        )
        for p in search.search_path_
        if p.get("params")
    ]
    xs, ys = zip(*path_points)
    ax.plot(xs, ys, "-o", color="red", alpha=0.7, markersize=4, zorder=2, label="local search path (fused)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)
    fig.colorbar(image, ax=ax, label="mAP (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _tsne_panels(model, test, best):
    """(title, 2-d t-SNE embedding) of the held-out image features, text features and fused representation."""
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    features = model["features"].transform(test.data)  # columns "image__..." and "text__..."
    image = features.filter(regex=r"^image__").to_numpy()
    text = features.filter(regex=r"^text__").to_numpy()
    clf = model["clf"]
    fused = clf.fuse(features)
    # t-SNE needs perplexity < n; 30 is its usual value, kept for samples large enough to allow it.
    perplexity = min(30.0, (len(features) - 1) / 3)

    def embed(Z):
        # One OpenMP thread: the Barnes-Hut gradient of a few hundred points is too small to gain from more, and
        # on busy cores each of its 1000 iterations waits at thread barriers (500 points on 2 shared cores: 45 s
        # with 2 threads, 6 s with 1).
        with threadpool_limits(1, user_api="openmp"):
            return TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(Z)

    # The image and text features are standardised as the fusion head standardises them before projecting;
    # the fused vectors are taken as the head sees them.
    return [
        (f"image features (DiT block {best['features__image__block']}, t={best['features__image__timestep']})",
         embed(StandardScaler().fit_transform(image))),
        (f"text features (block {best['features__text__block']}, t={best['features__text__timestep']:g})",
         embed(StandardScaler().fit_transform(text))),
        (f"fused representation ({clf.projection_dim}-d sum of projections)", embed(fused)),
    ]


def tsne(model, test, best, path):
    """Three t-SNE panels of the held-out samples: image features, text features, fused representation.

    A mosaic holds one to four items, so a sample has no single class to colour it by. Mosaics whose items are
    all of one class are coloured by that class; mosaics with items of several classes are drawn in grey,
    behind. Saves the figure to ``path``; returns ``path`` and the counts of each kind.
    """
    panels = _tsne_panels(model, test, best)
    Y = np.asarray(test.Y)
    single = Y.sum(axis=1) == 1
    label = Y.argmax(axis=1)
    plt = _pyplot()
    # tab10, with its grey (Sneaker) made black so that no class looks like the grey of mixed mosaics.
    colours = [(0.0, 0.0, 0.0) if k == 7 else c for k, c in enumerate(plt.get_cmap("tab10").colors)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, (title, xy) in zip(axes, panels):
        ax.scatter(*xy[~single].T, s=6, color="0.8", linewidths=0, label="several classes")
        for k, name in enumerate(test.label_names):
            ax.scatter(*xy[single & (label == k)].T, s=12, color=colours[k % len(colours)], linewidths=0,
                       label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False, markerscale=1.5)
    fig.suptitle(
        f"t-SNE of {len(Y)} held-out mosaics. Colour: the class of the {int(single.sum())} mosaics whose items are "
        f"all of one class; grey: the {int((~single).sum())} with several classes",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.13, wspace=0.04)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, {"single_class": int(single.sum()), "several_classes": int((~single).sum())}
