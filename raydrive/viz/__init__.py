"""Pictures of what a model predicts: BEV views and camera images of key frames, animated scenes, and
training curves (matplotlib on the Agg canvas, and Pillow).

- `render.render_frame(rec, pred, frame, dataroot)`: the BEV view (`bev.py`) and the six cameras with
  projected boxes (`cameras.py`) of one info record, from the model's outputs for it in its box frame.
- `bev.bev_layer(key)`: draw a further prediction dict entry (map polylines, tracks, trajectories and
  the ego plan are built in).
- `curves.write_curves(run_dir)`: loss / lr / throughput / metric curves from the run's TensorBoard files.
- `checkpoint.viz_checkpoint(...)`: `raydrive viz`.

Training draws the fixed frames (`render.pick_frames`) after every evaluation through the evaluator's
optional `pictures` method (`raydrive.spec.Evaluator`); the engine never imports this package.
"""
