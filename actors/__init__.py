"""m2cache.actors: the actors of one engine, the messages between them, and what the executor computes.

Four actors share one lifecycle (``base.Actor``: setup -> loop over a bounded inbox -> teardown; Stop is a
message in the same inbox; in teardown every request still waiting gets ``EngineClosedError``), and each
reaches another only through the channel the engine gave it (``base.Channel``): the SSD reader (reads, checks,
retries), the DRAM manager (the layer FIFO, preloads, serves), the HBM manager (the device pool's slots and the
copies up) and the executor (admission, batching, steps). The design's fifth, the predictor, is the executor's
(``predictor.py``): it reads the hidden state the layer before just left on the compute thread, so it chooses
each layer's neurons there, at the end of that layer's job, and the executor sends the choice on.

One decode step, layer by layer (``──>`` a message on a bounded channel, ``<··`` a future's answer, ``==>`` a hop
to a thread)::

    engine ── Submit ──> executor       once per request (Cancel and Resume wake it about one)

    executor (event loop)                                compute thread
      | ================================================> plan the step (step_plan), embed, attention 0,
      |                                                   predictor: layer 0's neurons (looking ahead: 1's too)
      | per layer L:
      | Progress(L) ──────────────────────────> dram      preloads L+1..L+k (ReadRequest ──> ssd)
      | NeuronRequest(L, ids) ──> hbm                     plans slots: hits, misses, evictions
      |                            | Fetch ──────────> dram  pins DRAM rows; reads what it lacks
      |                            |                      |   (ReadRequest ──> ssd <·· bundles)
      |                            |<·· FetchReply ·······
      |                            | ==> copy thread: rows up into the pool
      |<·· WeightsReady (slots or DRAM rows, copy event)
      | ================================================> FFN L, attention L+1,
      |                                                   predictor: layer L+1's neurons
      | Release(L) ───────────────────────────> dram      unpins

Hops per layer of a decode token, counted by ``engine.stats()["messages"]`` (``python tools/hops.py``: the demo
model, 30 layers, 32 decode tokens):

- layer by layer, every layer in DRAM: 4 messages (Progress, NeuronRequest, Fetch, Release), 2 futures
  (FetchReply, WeightsReady), 1 round trip to the compute thread, and 1 to the copy thread where copies are made
  (none on the CPU computing from DRAM; with a device pool, Fetch and the copy only for a layer with misses);
- with a DRAM budget of 30% of the FP16 FFN bytes: 5.2 messages, the reader's 1.2 ReadRequests besides;
- DRAM keeping every layer (the native step, one sequence): 0 messages; one compute-thread round trip a token.
  The DRAM manager tells the executor once (``KeptLayers``) that every layer is in.

(Before the predictor was folded into the executor's jobs it was an actor that forwarded each layer's
ranking: 5 and 6.2 messages a layer.) In turn, layer L's NeuronRequest leaves once layer L-1's job returned
its choice, so the plan, the reads and the copies of a layer wait for the compute of the one before and the
compute waits for them. With ``EngineConfig.lookahead`` (decode) a job chooses the layer after next from its
residual: layer L+1's NeuronRequest leaves before layer L's job starts, and its plan, reads and copies run while
layer L computes (the HBM manager keeps layer L's slots out of layer L+1's evictions).
"""
