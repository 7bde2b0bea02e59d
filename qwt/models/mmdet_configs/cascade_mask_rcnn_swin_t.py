# Cascade Mask R-CNN Swin-T as in the QwT detection reference (Swin-Transformer-Object-Detection,
# cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py): mmdet 3's
# Cascade Mask R-CNN R50-FPN structure, a Swin backbone, three 4conv1fc box heads with GIoU loss
# (decoded boxes). mmdet 3 ships no such config. The reference's SyncBN in the box heads is BN here
# (identical in test mode, same keys). Test-time behaviour (what we evaluate) is that of the reference.
_base_ = 'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py'
embed_dims = 96
depths = [2, 2, 6, 2]
num_heads = [3, 6, 12, 24]


def _bbox_head(stds):
    return dict(
        type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=256, conv_out_channels=256,
        fc_out_channels=1024, roi_feat_size=7, num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
        reg_class_agnostic=False, reg_decoded_bbox=True, norm_cfg=dict(type='BN', requires_grad=True),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(
        _delete_=True, type='SwinTransformer', embed_dims=embed_dims, depths=depths, num_heads=num_heads,
        window_size=7, mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
        drop_path_rate=0.2, patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False, convert_weights=False,
        init_cfg=None),
    neck=dict(in_channels=[embed_dims, embed_dims * 2, embed_dims * 4, embed_dims * 8]),
    roi_head=dict(bbox_head=[
        _bbox_head([0.1, 0.1, 0.2, 0.2]),
        _bbox_head([0.05, 0.05, 0.1, 0.1]),
        _bbox_head([0.033, 0.033, 0.067, 0.067]),
    ]))
