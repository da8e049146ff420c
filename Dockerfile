# Image for the Ray cluster, training (`tocoad train-all`) and serving alike: cluster.yaml (cluster
# launcher) and deploy/*.yaml (KubeRay) run it on every node. Build and push:
#   docker build -t ghcr.io/example/tocoad-ray:0.1.0-gpu . && docker push ghcr.io/example/tocoad-ray:0.1.0-gpu
# The Ray inside must match the cluster's rayVersion (2.60.0); ray-ml images stopped after 2.49, so
# start from the plain Ray GPU image (CUDA, Python 3.11) and let pip add torch & co.
FROM rayproject/ray:2.60.0-py311-gpu

# The base image runs as user `ray` (uid 1000, gid 100); it must own /app because the editable
# install writes tocoad_ray.egg-info there.
COPY --chown=1000:100 . /app

# Editable, so `serve.app:build`, `jobs` and configs/ resolve from /app, as in the repo. The gpu extra
# adds faiss-gpu-cu12; faiss-cpu (a base dependency) installs into the same `faiss` folder, so remove
# both and put the GPU build back alone, then fail the build if faiss lost its GPU classes.
RUN pip install --no-cache-dir -e "/app[gpu]" \
 && pip uninstall -y faiss-cpu faiss-gpu-cu12 \
 && pip install --no-cache-dir --no-deps "faiss-gpu-cu12>=1.8" \
 && python -c "import faiss; assert hasattr(faiss, 'StandardGpuResources'), 'faiss without GPU support'"

# Ray jobs and `serve deploy` run from here, so relative paths (configs/paper.yaml, serve/config.yaml) work.
WORKDIR /app
