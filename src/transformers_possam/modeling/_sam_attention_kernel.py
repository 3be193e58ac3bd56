"""
The Triton source of `sam_attention_triton`'s kernel, in a module of its own: it imports Triton at import, which the
package does not require, so `sam_attention_triton._kernel` imports it on first use; Triton resolves the helper a
kernel calls among its module's globals.
"""

import triton
import triton.language as tl


@triton.jit
def product(a, b, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """`a @ b` in float32: exact float32 products for float32 tiles, float32 copies of 16-bit tiles under the
    interpreter, the tensor cores' 16-bit products otherwise."""
    if IEEE_DOT:
        result = tl.dot(a, b, input_precision="ieee")
    elif UPCAST_DOT:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def table_products(
    query,  # [BLOCK_QUERIES, FIRST_DIM] tile
    query_rest,  # [BLOCK_QUERIES, REST_DIM] tile (unused when REST_DIM is 0)
    rows_ptr,  # (n, n, d) relative-position rows, rows[a, b] = table[a - b + n - 1]
    rows_stride_0,
    rows_stride_1,
    size,  # n
    channel,
    channel_ok,
    rest_channel,
    rest_ok,
    TABLE_PAD: tl.constexpr,  # a power of 2 >= 2 n - 1 (at least 16)
    REST_DIM: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """`[BLOCK_QUERIES, TABLE_PAD]` float32: q_i . table[j] for every row j of the layer's resized table, one matmul.
    The table is read from the rows where it appears (`get_rel_pos` of a square attention: a Toeplitz tensor), its
    rows j >= n - 1 down the first column `rows[j - n + 1, 0]`, the others along the first row `rows[0, n - 1 - j]`."""
    entry = tl.arange(0, TABLE_PAD)
    entry_ok = entry < 2 * size - 1
    offset = tl.where(entry >= size - 1, (entry - size + 1) * rows_stride_0, (size - 1 - entry) * rows_stride_1)
    offset = tl.where(entry_ok, offset, 0)
    # rounded to the query's dtype (a float32 table beside a bf16 query under autocast, as autocast's einsums do)
    table = tl.load(
        rows_ptr + offset[:, None] + channel[None, :], mask=entry_ok[:, None] & channel_ok[None, :], other=0.0
    ).to(query.dtype)
    products = product(query, tl.trans(table), IEEE_DOT, UPCAST_DOT)
    if REST_DIM > 0:
        table_rest = tl.load(
            rows_ptr + offset[:, None] + rest_channel[None, :], mask=entry_ok[:, None] & rest_ok[None, :], other=0.0
        ).to(query.dtype)
        products += product(query_rest, tl.trans(table_rest), IEEE_DOT, UPCAST_DOT)
    return products


@triton.jit
def attend(
    query_ptr,  # (B, heads, N, d) with strides, d contiguous
    key_ptr,
    value_ptr,
    rows_h_ptr,  # (H, H, d) with strides, d contiguous: get_rel_pos rows, R_h[a, b] = table_h[a - b + H - 1]
    rows_w_ptr,  # (W, W, d) likewise
    output_ptr,  # (B, heads, N, d) with strides, d contiguous
    query_strides_b,
    query_strides_h,
    query_strides_n,
    key_strides_b,
    key_strides_h,
    key_strides_n,
    value_strides_b,
    value_strides_h,
    value_strides_n,
    output_strides_b,
    output_strides_h,
    output_strides_n,
    rows_h_stride_0,
    rows_h_stride_1,
    rows_w_stride_0,
    rows_w_stride_1,
    num_heads,
    tokens,
    height,
    width,
    scale,
    HEAD_DIM: tl.constexpr,
    FIRST_DIM: tl.constexpr,  # the channels in two power-of-2 blocks, [0, FIRST_DIM) and
    REST_DIM: tl.constexpr,  # [FIRST_DIM, FIRST_DIM + REST_DIM) (0: none): SAM-H's 80 as 64 + 16, not 128
    BLOCK_QUERIES: tl.constexpr,
    KEY_ROWS: tl.constexpr,  # grid rows of keys per step
    WIDTH_PAD: tl.constexpr,  # a power of 2 >= W: each grid row of keys padded to it
    HEIGHT_PAD: tl.constexpr,  # a power of 2 >= H and >= KEY_ROWS
    TABLE_H_PAD: tl.constexpr,  # powers of 2 >= 2 H - 1 and 2 W - 1 (at least 16): the resized tables' rows
    TABLE_W_PAD: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # float32 inputs: full-precision products, not TF32
    UPCAST_DOT: tl.constexpr,  # half-precision inputs under Triton's interpreter, whose 16-bit dot is wrong
):
    # one program per (sequence, block of queries), the blocks of one sequence consecutive in launch order: the
    # programs running at one time share their sequence's keys and values in the L2 cache (with the sequence first,
    # a global layer's concurrent programs would each stream another head's)
    query_blocks = tl.cdiv(tokens, BLOCK_QUERIES)
    sequence = tl.program_id(0) // query_blocks
    image = sequence // num_heads
    head = sequence % num_heads
    query_index = (tl.program_id(0) % query_blocks) * BLOCK_QUERIES + tl.arange(0, BLOCK_QUERIES)
    query_ok = query_index < tokens
    query_rows = (query_ptr + image.to(tl.int64) * query_strides_b + head * query_strides_h) + query_index[:, None].to(
        tl.int64
    ) * query_strides_n
    channel = tl.arange(0, FIRST_DIM)
    channel_ok = channel < HEAD_DIM
    query = tl.load(query_rows + channel[None, :], mask=query_ok[:, None] & channel_ok[None, :], other=0.0)
    if REST_DIM > 0:
        rest_channel = FIRST_DIM + tl.arange(0, REST_DIM)
        rest_ok = rest_channel < HEAD_DIM
        query_rest = tl.load(query_rows + rest_channel[None, :], mask=query_ok[:, None] & rest_ok[None, :], other=0.0)
    else:
        rest_channel = channel  # unused
        rest_ok = channel_ok
        query_rest = query
    # the bias factors from the query tile, rel_h(i, r) = q_i . R_h[h_i, r] = q_i . table_h[h_i - r + H - 1] and
    # rel_w(i, c) likewise: each query's products with every table row (one small matmul per table), then each
    # query's entries picked out; float32, not rounded to the inputs' dtype
    query_row = query_index // width
    query_column = query_index % width
    # a step's keys are KEY_ROWS whole rows of the key grid, each padded to WIDTH_PAD lanes: a lane's column is
    # the same in every step, so the rel_w part of the bias is made once
    lane = tl.arange(0, KEY_ROWS * WIDTH_PAD)
    lane_row = lane // WIDTH_PAD
    lane_column = lane % WIDTH_PAD
    column_ok = lane_column < width
    products_w = table_products(
        query,
        query_rest,
        rows_w_ptr,
        rows_w_stride_0,
        rows_w_stride_1,
        width,
        channel,
        channel_ok,
        rest_channel,
        rest_ok,
        TABLE_W_PAD,
        REST_DIM,
        IEEE_DOT,
        UPCAST_DOT,
    )
    entry_w = query_column[:, None] - lane_column[None, :] + width - 1
    entry_w = tl.minimum(tl.maximum(entry_w, 0), TABLE_W_PAD - 1)  # padding lanes: any entry (masked below)
    bias_w = tl.gather(products_w, entry_w, axis=1)
    products_h = table_products(
        query,
        query_rest,
        rows_h_ptr,
        rows_h_stride_0,
        rows_h_stride_1,
        height,
        channel,
        channel_ok,
        rest_channel,
        rest_ok,
        TABLE_H_PAD,
        REST_DIM,
        IEEE_DOT,
        UPCAST_DOT,
    )
    key_grid_row = tl.arange(0, HEIGHT_PAD)
    entry_h = query_row[:, None] - key_grid_row[None, :] + height - 1
    entry_h = tl.minimum(tl.maximum(entry_h, 0), TABLE_H_PAD - 1)
    bias_by_row = tl.gather(products_h, entry_h, axis=1)  # [BLOCK_QUERIES, HEIGHT_PAD]: rel_h(i, r)
    key_base = key_ptr + image.to(tl.int64) * key_strides_b + head * key_strides_h
    value_base = value_ptr + image.to(tl.int64) * value_strides_b + head * value_strides_h
    running_max = tl.full([BLOCK_QUERIES], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_QUERIES], dtype=tl.float32)
    accumulator = tl.zeros([BLOCK_QUERIES, FIRST_DIM], dtype=tl.float32)
    if REST_DIM > 0:
        accumulator_rest = tl.zeros([BLOCK_QUERIES, REST_DIM], dtype=tl.float32)
    for first_row in range(0, height, KEY_ROWS):
        key_row = first_row + lane_row
        key_ok = column_ok & (key_row < height)
        key_index = (key_row * width + lane_column).to(tl.int64)
        key_rows = key_base + key_index[:, None] * key_strides_n
        key = tl.load(key_rows + channel[None, :], mask=key_ok[:, None] & channel_ok[None, :], other=0.0)
        scores = product(query, tl.trans(key), IEEE_DOT, UPCAST_DOT)
        if REST_DIM > 0:
            key_rest = tl.load(key_rows + rest_channel[None, :], mask=key_ok[:, None] & rest_ok[None, :], other=0.0)
            scores += product(query_rest, tl.trans(key_rest), IEEE_DOT, UPCAST_DOT)
        step_rows = tl.minimum(first_row + tl.arange(0, KEY_ROWS), HEIGHT_PAD - 1)
        bias_h = tl.gather(bias_by_row, tl.broadcast_to(step_rows[None, :], [BLOCK_QUERIES, KEY_ROWS]), axis=1)
        bias_h = tl.reshape(
            tl.broadcast_to(bias_h[:, :, None], [BLOCK_QUERIES, KEY_ROWS, WIDTH_PAD]),
            [BLOCK_QUERIES, KEY_ROWS * WIDTH_PAD],
        )
        scores = scores * scale + bias_h + bias_w
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        probabilities = tl.exp(scores - new_max[:, None])
        correction = tl.exp(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probabilities, axis=1)
        value_rows = value_base + key_index[:, None] * value_strides_n
        value = tl.load(value_rows + channel[None, :], mask=key_ok[:, None] & channel_ok[None, :], other=0.0)
        rounded = probabilities.to(value.dtype)
        accumulator = accumulator * correction[:, None] + product(rounded, value, IEEE_DOT, UPCAST_DOT)
        if REST_DIM > 0:
            value_rest = tl.load(
                value_rows + rest_channel[None, :], mask=key_ok[:, None] & rest_ok[None, :], other=0.0
            )
            accumulator_rest = accumulator_rest * correction[:, None] + product(
                rounded, value_rest, IEEE_DOT, UPCAST_DOT
            )
        running_max = new_max
    output_rows = (output_ptr + image.to(tl.int64) * output_strides_b + head * output_strides_h) + query_index[
        :, None
    ].to(tl.int64) * output_strides_n
    tl.store(
        output_rows + channel[None, :],
        (accumulator / running_sum[:, None]).to(output_ptr.dtype.element_ty),
        mask=query_ok[:, None] & channel_ok[None, :],
    )
    if REST_DIM > 0:
        tl.store(
            output_rows + rest_channel[None, :],
            (accumulator_rest / running_sum[:, None]).to(output_ptr.dtype.element_ty),
            mask=query_ok[:, None] & rest_ok[None, :],
        )
